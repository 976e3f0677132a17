"""--train lora: adapters (peft) for every method that can take them. The reference is the same UNet
with its adapters off, the result is adapter weights that plain diffusers loads, and a LoRA run is
a run like any other for eval.py, the attack and chaining. SalUn and VDU refuse it in one sentence."""

import json
import sys

import pytest
import torch

import common
import mim_mu
import pure
import rl_critic
import vdu
from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "baselines"))
import esd  # noqa: E402
import fmn  # noqa: E402
import salun  # noqa: E402

SMALL = ["--n-eval-images", "0", "--device", "cpu"]
RUNS = {  # a few steps of each method on the tiny SD pipeline, and the layers its adapters wrap
    "pure": (pure, ["--concept", "church", "--steps", "2", "--n-forget", "2", "--n-retain", "2", "--batch-size", "2"],
             "attn[12]"),
    "mim_mu": (mim_mu, ["--concept", "church", "--epochs", "1", "--n-forget", "2", "--batch-size", "2"], "attn2"),
    "rl_critic": (rl_critic, ["--concept", "church", "--iterations", "1", "--samples-per-iteration", "4",
                              "--sample-steps", "3", "--minibatch", "4", "--warmup-epochs", "1", "--critic-epochs", "1",
                              "--clip-model", str(common.TOY_DIR / "clip"), "--clip-range", "0.2"], "attn2"),
    "esd": (esd, ["--concept", "church", "--steps", "2", "--sample-steps", "4"], "attn1"),  # an object: ESD-u's layers
    "fmn": (fmn, ["--concept", "church", "--steps", "2", "--n-forget", "2", "--batch-size", "2"], "attn[12]"),
}


def unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size, generator=g)
    c = torch.randn(2, 4, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([900, 100]), encoder_hidden_states=c).sample


def test_the_reference_is_the_same_unet_with_its_adapters_off_and_owns_no_weights(toy_models):
    unet = common.frozen_copy(toy_models.unet)
    before = unet_out(unet)
    ref = common.reference(unet, "lora")
    params = common.select_trainable(unet, "lora", lora_rank=2, lora_on="xattn")
    assert params and all(p.requires_grad for p in params) and not list(ref.parameters())
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert all(".attn2." in n and "lora_" in n for n in names)
    assert torch.equal(unet_out(unet), before)  # B = 0: training starts at the starting model
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    assert not torch.allclose(unet_out(unet), before, atol=1e-4)  # the adapters act ...
    assert torch.equal(unet_out(ref), before)                      # ... and the reference has none
    assert all(p.requires_grad for p in params) and unet_out(unet).shape == before.shape  # switched back on
    assert ref.config.in_channels == unet.config.in_channels and isinstance(common.reference(unet, "full"),
                                                                            torch.nn.Module)


@pytest.mark.parametrize("name", RUNS)
def test_lora_takes_its_own_learning_rate_unless_one_is_given(name):
    module = RUNS[name][0]
    for model, column in [("toy", "toy"), (common.DEFAULT_MODEL, "sd")]:
        concept = "circle" if model == "toy" else "church"
        lora = module.parse_args(["--model", model, "--concept", concept, "--train", "lora"])
        assert lora.lr == module.LORA_LR[column], (model, lora.lr)
        assert module.parse_args(["--model", model, "--concept", concept, "--train", "lora", "--lr", "3e-3"]).lr == 3e-3
        assert module.parse_args(["--model", model, "--concept", concept]).lr != module.LORA_LR[column]


@pytest.mark.slow(40)
@pytest.mark.parametrize("method", list(RUNS))
def test_a_lora_run_saves_adapters_that_plain_diffusers_loads(tiny_sd, tmp_path, method):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    module, flags, layers = RUNS[method]
    out = tmp_path / method
    module.main(["--model", str(tiny_sd), "--train", "lora", "--lora-rank", "2", "--lr", "1e-2",
                 "--output-dir", str(out), *flags, *SMALL])
    assert not (out / "unet").exists() and (out / common.LORA_FILE).stat().st_size < 5e6
    keys = load_file(out / common.LORA_FILE)
    assert keys and all(k.startswith("unet.") and ("lora.down" in k or "lora.up" in k) for k in keys)
    import re
    assert all(re.search(rf"\.{layers}\.to_(q|k|v|out\.0)\.", k) for k in keys), sorted(keys)[:4]
    run = json.loads((out / "run.json").read_text())
    assert run["args"]["train"] == "lora" and run["args"]["lora_rank"] == 2
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    base = unet_out(pipe.unet)
    pipe.load_lora_weights(out)
    ours = common.load_run_unet(out)  # what eval.py --run, the attack and chaining load: adapters merged
    assert not torch.allclose(unet_out(pipe.unet), base, atol=1e-6)  # the adapters trained
    assert torch.allclose(unet_out(ours), unet_out(pipe.unet), atol=1e-5)


@pytest.mark.slow(30)
def test_lora_runs_chain_and_load_in_diffusers_as_two_adapters(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline
    first, second = tmp_path / "pure-church", tmp_path / "mim_mu-van-gogh"
    lora = ["--train", "lora", "--lora-rank", "2", "--lr", "1e-2", "--n-forget", "2", "--batch-size", "2"]
    pure.main(["--model", str(tiny_sd), "--concept", "church", "--steps", "2", "--n-retain", "2",
               "--output-dir", str(first), *lora, *SMALL])
    models = common.load_models(str(first), torch.device("cpu"))
    assert models.chain[0]["run"] == str(first) and not common.has_lora(models.unet)  # merged: a plain UNet
    assert torch.allclose(unet_out(models.unet), unet_out(common.load_run_unet(first)))
    mim_mu.main(["--model", str(first), "--concept", "Van Gogh", "--epochs", "1", "--output-dir", str(second),
                 *lora, *SMALL])
    assert json.loads((second / "run.json").read_text())["chain"][0]["run"] == str(first)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipe.load_lora_weights(first, adapter_name="first")
    pipe.load_lora_weights(second, adapter_name="second")
    pipe.set_adapters(["first", "second"])  # a chain of LoRA runs: each run's adapters, all on
    assert torch.allclose(unet_out(common.load_run_unet(second)), unet_out(pipe.unet), atol=1e-5)


@pytest.mark.slow(25)
def test_eval_reads_a_lora_run(tmp_path):
    out = tmp_path / "pure-circle"
    pure.main(["--model", "toy", "--concept", "circle", "--train", "lora", "--steps", "2", "--n-forget", "4",
               "--n-retain", "4", "--batch-size", "4", "--output-dir", str(out), "--n-eval-images", "4",
               "--device", "cpu"])
    written = json.loads((out / "metrics.json").read_text())
    r = run_script("eval.py", "--run", out, "--n-images", "4", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "unlearned" in r.stdout and f"{written['unlearned']['ua']:.1%}" in r.stdout


@pytest.mark.parametrize("module", [salun, vdu])
def test_salun_and_vdu_refuse_lora_in_one_sentence(module):
    with pytest.raises(common.UsageError, match="does not train LoRA adapters"):
        module.parse_args(["--model", "toy", "--concept", "circle", "--train", "lora"])
