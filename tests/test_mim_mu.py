"""MiM-MU: only cross-attention changes, the MI proxy falls, and it forgets on the toy."""

import json

import pytest
import torch

import common
from conftest import changed_parameters, run_script
import mim_mu



def test_target_is_the_frozen_unconditional_prediction_and_has_no_gradient(tiny_sd):
    models = common.load_models(str(tiny_sd), torch.device("cpu"))
    unet, ref = models.unet, common.frozen_copy(models.unet)
    common.select_trainable(unet, "xattn", verbose=False)
    g = torch.Generator().manual_seed(0)
    x_t, t, _ = common.add_noise(models.scheduler, torch.randn(2, 4, 8, 8, generator=g), g)
    c = common.encode_prompts(models, ["a photo of a church"] * 2)
    terms = mim_mu.loss(unet, ref, models, x_t, t, c, anchor_uncond=False)
    empty = common.encode_prompts(models, [""] * 2)
    with torch.no_grad():
        expected = (unet(x_t, t, encoder_hidden_states=c).sample - ref(x_t, t, encoder_hidden_states=empty).sample).pow(2).mean()
    assert torch.allclose(terms["L_mi"], expected, atol=1e-6)
    terms["L_mi"].backward()
    assert all(p.grad is None for p in ref.parameters())  # stop-gradient on the target


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


@pytest.mark.xfail(reason="open (issue 5): on the toy MiM-MU forgets but also damages the other shapes; "
                          "measured 2026-11-23 with lr 3e-4: UA 89%, in-domain retain 77% vs base 95% (square and diamond, "
                          "whose prompts the toy text encoder barely tells from circle's: docs/mim_mu_search.md)",
                   strict=False)
def test_mim_mu_forgets_circle_on_the_toy_without_compensation(tmp_path):
    out = tmp_path / "mim_mu-circle"
    r = run_script("mim_mu.py", "--model", "toy", "--concept", "circle",
                        "--output-dir", str(out), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    print(json.dumps(m, indent=1))
    assert m["unlearned"]["ua"] >= 0.90
    assert m["unlearned"]["retain_in"] >= m["base"]["retain_in"] - 0.05
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    StableDiffusionPipeline.from_pretrained(common.TOY_DIR / "pipeline", unet=unet, safety_checker=None)
