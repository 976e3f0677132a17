"""MiM-MU: only cross-attention changes, the MI proxy falls, and it forgets on the toy."""

import json

import pytest
import torch

import common
import eval as evaluation
from conftest import changed_parameters, run_script
import mim_mu


def test_target_is_the_frozen_unconditional_prediction_and_has_no_gradient(tiny_sd):
    import copy
    models = common.load_models(str(tiny_sd), torch.device("cpu"))
    unet = models.unet
    common.select_trainable(unet, "xattn", verbose=False)
    # a reference whose weights WOULD collect gradients if the loss let any reach it: only the
    # stop-gradient inside `loss` keeps its .grad empty
    ref = copy.deepcopy(unet).requires_grad_(True)
    with torch.no_grad():  # and a different one, so a target taken from the trained UNet would show
        for p in ref.parameters():
            p.add_(1e-2 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    x_t, t, _ = common.add_noise(models.scheduler, torch.randn(2, 4, 8, 8, generator=g), g)
    c = common.encode_prompts(models, ["a photo of a church"] * 2)
    total, terms = mim_mu.loss(unet, ref, models, x_t, t, c, anchor_uncond=False)
    empty = common.encode_prompts(models, [""] * 2)
    with torch.no_grad():
        expected = (unet(x_t, t, encoder_hidden_states=c).sample - ref(x_t, t, encoder_hidden_states=empty).sample).pow(2).mean()
        from_trained = (unet(x_t, t, encoder_hidden_states=c).sample - unet(x_t, t, encoder_hidden_states=empty).sample).pow(2).mean()
    assert torch.allclose(terms["L_mi"], expected, atol=1e-6) and torch.equal(total, terms["L_mi"])
    assert not torch.allclose(terms["L_mi"], from_trained, atol=1e-6)
    total.backward()
    assert all(p.grad is None for p in ref.parameters())  # stop-gradient on the target
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters())


def test_the_empty_prompt_anchor_is_the_second_term_of_the_total(tiny_sd):
    models = common.load_models(str(tiny_sd), torch.device("cpu"))
    ref = common.frozen_copy(models.unet)
    with torch.no_grad():
        for p in models.unet.parameters():
            p.add_(1e-2 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x_t, t, _ = common.add_noise(models.scheduler, torch.randn(2, 4, 8, 8, generator=g), g)
    c = common.encode_prompts(models, ["a photo of a church"] * 2)
    total, terms = mim_mu.loss(models.unet, ref, models, x_t, t, c, anchor_uncond=True)
    empty = common.encode_prompts(models, [""] * 2)
    with torch.no_grad():
        target = ref(x_t, t, encoder_hidden_states=empty).sample
        l_uncond = (models.unet(x_t, t, encoder_hidden_states=empty).sample - target).pow(2).mean()
    assert torch.allclose(terms["L_uncond"], l_uncond, atol=1e-6)
    assert torch.allclose(total, terms["L_mi"] + l_uncond, atol=1e-6)


@pytest.mark.slow(26)
def test_mim_mu_changes_only_attn2_and_the_mi_proxy_falls(tiny_sd, tmp_path):
    out = tmp_path / "run"
    r = run_script("mim_mu.py", "--model", str(tiny_sd), "--concept", "church",
                        "--epochs", "10", "--n-forget", "4", "--batch-size", "4", "--lr", "1e-3",
                        "--n-eval-images", "0", "--output-dir", str(out), "--device", "cpu", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    changed = changed_parameters(out / "unet", tiny_sd / "unet")
    assert changed and all(".attn2." in n for n in changed)
    run = json.loads((out / "run.json").read_text())
    assert run["mi_proxy_end"] < 0.5 * run["mi_proxy_start"], run


def test_twenty_epochs_of_mim_mu_already_forget_most_striped_images_and_keep_the_other_textures(tmp_path):
    # The fast tier's end-to-end run: two thirds of the default 30 epochs, 32 images per group.
    # Measured at seed 0 (one thread): UA 90.6% (base 0%), in-domain retain 96.9% (base 96.9%),
    # cross-domain retain 93.8% (base 100%); at 15 epochs UA was 84%, at 8 epochs 16%.
    out = tmp_path / "mim_mu-striped-short"
    r = run_script("mim_mu.py", "--model", "toy", "--concept", "striped", "--seed", "0", "--epochs", "20",
                   "--n-eval-images", "32", "--output-dir", str(out), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    new, base = m["unlearned"], m["base"]
    assert base["ua"] < 0.1 and new["ua"] >= 0.8, new
    assert new["retain_in"] >= base["retain_in"] - 0.05 and new["retain_cross"] >= base["retain_cross"] - 0.1, new


@pytest.mark.slow(56)
def test_mim_mu_forgets_striped_at_seed_0_on_the_toy_without_compensation(tmp_path):
    # one concept and one seed: the 3-seed picture over all concepts is the benchmark's
    # (the benchmark's record at seed 0, benchmarks/records/mim_mu/striped-seed0.json: UA 96.9%, in-domain
    # retain 100% vs base 98.4%)
    out = tmp_path / "mim_mu-striped"
    r = run_script("mim_mu.py", "--model", "toy", "--concept", "striped", "--seed", "0",
                   "--output-dir", str(out), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    print(json.dumps(m, indent=1))
    assert m["n_forget_images"] >= 64 and m["n_retain_images"] >= 64
    assert evaluation.meets_bar("mim_mu", m), m["unlearned"]
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    StableDiffusionPipeline.from_pretrained(common.TOY_DIR / "pipeline", unet=unet, safety_checker=None)
