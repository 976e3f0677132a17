"""SDXL (StableDiffusionXLPipeline): two text encoders, the pooled embedding and the added time ids
reach the UNet through one extra token of the conditioning; the sampler equals diffusers' SDXL
pipeline; every method trains on a tiny random SDXL pipeline and its result loads in diffusers."""

import json
import shutil
import sys

import pytest
import torch

import common
import mim_mu
import pure
import rl_critic
import vdu
from conftest import ROOT

sys.path.insert(0, str(ROOT / "baselines"))
import esd  # noqa: E402
import fmn  # noqa: E402
import salun  # noqa: E402

CPU = torch.device("cpu")
SMALL = ["--n-eval-images", "0", "--device", "cpu"]
RUNS = {  # a few steps of each method and baseline
    "pure": (pure, ["--steps", "2", "--n-forget", "2", "--n-retain", "2", "--batch-size", "2"]),
    "mim_mu": (mim_mu, ["--epochs", "1", "--n-forget", "2", "--batch-size", "2"]),
    "vdu": (vdu, ["--steps", "2", "--n-forget", "2", "--batch-size", "2", "--fisher-samples", "2"]),
    "rl_critic": (rl_critic, ["--iterations", "1", "--samples-per-iteration", "4", "--sample-steps", "3",
                              "--minibatch", "4", "--warmup-epochs", "1", "--critic-epochs", "1",
                              "--clip-model", str(common.TOY_DIR / "clip"), "--clip-range", "0.2"]),
    "esd": (esd, ["--steps", "2", "--sample-steps", "4"]),
    "salun": (salun, ["--steps", "2", "--n-forget", "4", "--n-retain", "4", "--batch-size", "2",
                      "--mask-ratio", "0.3"]),
    "fmn": (fmn, ["--steps", "2", "--n-forget", "2", "--batch-size", "2"]),
}


def pipeline(folder):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_sampler_equals_diffusers_sdxl_pipeline(tiny_sdxl):
    models = common.load_models(str(tiny_sdxl), CPU)
    assert models.is_sdxl and models.time_ids == (16, 16, 0, 0, 16, 16)  # 8 latent pixels x the VAE's 2
    assert models.guidance_scale == 5.0  # the SDXL pipeline's default
    prompts, seeds = ["a photo of a church", "a painting by Monet"], [0, 1]
    ours = common.sample(models, prompts, seeds, steps=10, guidance_scale=7.5)
    pipe = pipeline(tiny_sdxl)
    run = lambda kind: pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds],  # noqa: E731
                            output_type=kind, num_inference_steps=10, guidance_scale=7.5).images
    latents = run("latent")
    assert (ours.latents - latents).abs().max() < 1e-4 * latents.abs().max()  # |latents| ~ 30 here
    assert ((ours.images + 1) / 2 - run("pt")).abs().max() < 1e-4
    pipe.unet = models.unet  # the unpacking hook lets diffusers' own calls (added_cond_kwargs) through
    assert torch.equal(run("latent"), latents)


def test_the_extra_token_carries_the_pooled_embedding_and_time_ids_and_the_empty_prompt_is_zeros(tiny_sdxl):
    models = common.load_models(str(tiny_sdxl), CPU)
    pipe = pipeline(tiny_sdxl)
    c = common.encode_prompts(models, ["a red circle", ""])
    assert c.shape == (2, 16 + 1, 64)  # the toy tokenizer's 16 tokens, then the extra one
    states, _, pooled, negative_pooled = pipe.encode_prompt(["a red circle"], device=CPU)
    assert torch.allclose(c[0, :-1], states[0], atol=1e-6)
    assert torch.allclose(c[0, -1, :24], pooled[0], atol=1e-6)
    assert c[0, -1, 24:30].tolist() == [16, 16, 0, 0, 16, 16] and not c[0, -1, 30:].any()
    # "" is SDXL's unconditional input: zeros (force_zeros_for_empty_prompt), as the pipeline's
    # negative prompt, with the same time ids
    assert not c[1, :-1].any() and not c[1, -1, :24].any() and not negative_pooled.any()
    assert c[1, -1, 24:30].tolist() == [16, 16, 0, 0, 16, 16]
    # one tensor in, the same output as diffusers' explicit call
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([700, 100])
    time_ids = c[:, -1, 24:30]
    with torch.no_grad():
        packed = models.unet(x, t, encoder_hidden_states=c).sample
        by_position = models.unet(x, t, c).sample
        explicit = models.unet(x, t, encoder_hidden_states=c[:, :-1],
                               added_cond_kwargs={"text_embeds": c[:, -1, :24], "time_ids": time_ids}).sample
    assert torch.equal(packed, explicit) and torch.equal(by_position, explicit)
    assert torch.equal(common.frozen_copy(models.unet)(x, t, encoder_hidden_states=c).sample, packed)
    with pytest.raises(TypeError, match="by name"):  # nothing is silently dropped
        models.unet(x, t, c, None)


def test_without_force_zeros_the_empty_prompt_is_encoded_text(tiny_sdxl, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_sdxl, folder)
    index = folder / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "force_zeros_for_empty_prompt": False}))
    models = common.load_models(str(folder), CPU)
    states = pipeline(folder).encode_prompt([""], device=CPU)[0]
    assert not models.zero_empty_prompt and torch.allclose(common.encode_prompts(models, [""])[0, :-1], states[0],
                                                           atol=1e-6)


@pytest.mark.parametrize("name", RUNS)
def test_every_method_trains_on_sdxl_and_its_result_loads_in_diffusers(tiny_sdxl, tmp_path, name):
    from diffusers import UNet2DConditionModel
    module, extra = RUNS[name]
    out = tmp_path / name
    module.main(["--model", str(tiny_sdxl), "--concept", "church", *extra, *SMALL, "--output-dir", str(out)])
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert any(not torch.equal(p, q) for p, q in zip(unet.parameters(), common.load_unet(tiny_sdxl).parameters()))
    pipe = pipeline(tiny_sdxl)
    pipe.unet = unet
    image = pipe(["a photo of a church"], num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()


def test_a_lora_run_on_sdxl_saves_adapters_that_diffusers_sdxl_pipeline_loads(tiny_sdxl, tmp_path):
    out = tmp_path / "run"
    pure.main(["--model", str(tiny_sdxl), "--concept", "church", "--train", "lora", "--lora-rank", "2", "--lr", "1e-2",
               *RUNS["pure"][1], *SMALL, "--output-dir", str(out)])
    assert (out / common.LORA_FILE).exists() and not (out / "unet").exists()
    pipe = pipeline(tiny_sdxl)
    run = lambda: pipe(["a photo of a church"], num_inference_steps=2, output_type="latent",  # noqa: E731
                       guidance_scale=7.5, generator=torch.Generator().manual_seed(0)).images
    before = run()
    pipe.load_lora_weights(out)
    after = run()
    assert not torch.allclose(before, after)
    # merged by the project's loader: the same UNet as diffusers' adapters give
    merged = common.load_run_unet(out)
    models = common.load_models(str(tiny_sdxl), CPU)
    ours = common.sample(models, ["a photo of a church"], [0], unet=merged, steps=2, guidance_scale=7.5,
                         decode=False).latents
    assert (ours - after).abs().max() < 1e-4 * after.abs().max()
    # chaining: a second method continues from the LoRA run, its reference the merged UNet
    second = tmp_path / "second"
    mim_mu.main(["--model", str(out), "--concept", "Monet", *RUNS["mim_mu"][1], *SMALL, "--output-dir", str(second)])
    run = json.loads((second / "run.json").read_text())
    assert run["base_model"] == str(tiny_sdxl) and [c["concept"] for c in run["chain"]] == ["church"]
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    c = common.encode_prompts(models, ["a photo of a church"])
    with torch.no_grad():  # the reloaded chain's UNet unpacks the extra token as the original does
        assert common.load_run_unet(second)(x, t, encoder_hidden_states=c).sample.shape == x.shape


@pytest.mark.parametrize("cls", ["StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"])
def test_the_refiner_and_image_conditioned_sdxl_pipelines_are_refused_in_one_sentence(tmp_path, cls):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    with pytest.raises(common.UsageError, match=f"is a {cls}: of SDXL's pipelines only the text-to-image one"):
        common.load_models(str(tmp_path), CPU)


def test_the_attack_refuses_sdxl_in_one_sentence(tiny_sdxl, tmp_path):
    import attack
    run = tmp_path / "run"  # a saved run of the SDXL model: its UNet unchanged
    shutil.copytree(tiny_sdxl / "unet", run / "unet")
    (run / "run.json").write_text(json.dumps({"base_model": str(tiny_sdxl), "method": "pure",
                                              "args": {"concept": "church", "model": str(tiny_sdxl)}}))
    with pytest.raises(common.UsageError, match="SDXL has two, which it does not handle yet"):
        attack.main(["--run", str(run), "--device", "cpu"])


def test_a_unet_that_takes_other_size_ids_than_sdxl_base_is_refused_in_one_sentence(tiny_sdxl):
    unet = common.load_unet(tiny_sdxl)  # takes a pooled embedding of 24 and 6 size ids
    with pytest.raises(common.UsageError, match="an SDXL refiner"):
        common.with_sdxl_inputs(unet, "refiner", pooled=32)  # 32 + 5 x 8: a refiner's aesthetic-score layout
