"""PURE: the sign of the NPO loss, its saturation, and that it forgets on the toy."""

import json

import pytest
import torch

import common
import eval as evaluation
from conftest import changed_parameters, readme_quick_start, run_script
import pure


def _batch(models, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 4, 8, 8, generator=g)
    x_t, t, eps = common.add_noise(models.scheduler, x0, g)
    cond = common.encode_prompts(models, ["a photo of a church"] * n)
    return x_t, t, eps, cond


def test_one_step_on_the_forget_loss_increases_delta(tiny_sd):
    models = common.load_models(str(tiny_sd), torch.device("cpu"))
    unet, ref = models.unet, common.frozen_copy(models.unet)
    params = common.select_trainable(unet, "full", verbose=False)
    x_t, t, eps, cond = _batch(models)
    e_ref = pure.denoise_error(ref(x_t, t, encoder_hidden_states=cond).sample, eps)

    def delta():
        with torch.no_grad():
            return (pure.denoise_error(unet(x_t, t, encoder_hidden_states=cond).sample, eps) - e_ref).mean().item()

    assert abs(delta()) < 1e-6  # theta starts at the reference
    opt = torch.optim.SGD(params, lr=1e-2)
    loss, _ = pure.forget_loss(pure.denoise_error(unet(x_t, t, encoder_hidden_states=cond).sample, eps), e_ref, 100.0)
    loss.backward()
    opt.step()
    assert delta() > 1e-5, "minimising L_forget must push delta = e_theta - e_ref up"


def test_at_delta_zero_the_forget_loss_is_gradient_ascent_and_it_saturates():
    e_theta = torch.full((4,), 0.3, requires_grad=True)
    loss, _ = pure.forget_loss(e_theta, torch.full((4,), 0.3), beta=100.0)
    loss.backward()
    # d/d e_i of -(2/beta) mean log sigmoid(beta (e - e_ref)) at delta = 0 is -1/n: ascent on mean(e)
    assert torch.allclose(e_theta.grad, torch.full((4,), -0.25))
    e_far = torch.full((4,), 0.5, requires_grad=True)
    loss, _ = pure.forget_loss(e_far, torch.full((4,), 0.3), beta=100.0)  # beta * delta = 20
    loss.backward()
    assert e_far.grad.abs().max() < 1e-8  # forgetting has saturated: no more push


def test_the_total_is_the_phase_term_plus_lambda_kl_and_no_gradient_reaches_the_reference(tiny_sd):
    import copy
    models = common.load_models(str(tiny_sd), torch.device("cpu"))
    unet = models.unet
    common.select_trainable(unet, "full", verbose=False)
    ref = copy.deepcopy(unet).requires_grad_(True)  # would collect gradients without the stop-gradient
    with torch.no_grad():
        for p in unet.parameters():  # theta away from the reference, so L_KL and delta are not 0
            p.add_(1e-2 * torch.randn_like(p))
    forget = _batch(models, seed=0)
    retain = _batch(models, seed=1)
    total, terms = pure.loss(unet, ref, models, forget, retain, "forget", beta=30.0, kl_weight=10.0)
    assert set(terms) == {"L_forget", "delta", "L_KL"} and terms["L_KL"] > 0
    assert torch.allclose(total, terms["L_forget"] + 10.0 * terms["L_KL"])
    total.backward()
    assert all(p.grad is None for p in ref.parameters())
    # the retain half's KL is against the reference's prediction on the same x_t, c_r
    x_r, t_r, _, c_r = retain
    with torch.no_grad():
        kl = (unet(x_r, t_r, encoder_hidden_states=c_r).sample - ref(x_r, t_r, encoder_hidden_states=c_r).sample)
    assert torch.allclose(terms["L_KL"], kl.pow(2).mean(), atol=1e-6)
    total, terms = pure.loss(unet, ref, models, forget, retain, "repair", beta=30.0, kl_weight=10.0)
    assert set(terms) == {"L_repair", "L_KL"}
    assert torch.allclose(total, terms["L_repair"] + 10.0 * terms["L_KL"])


@pytest.mark.slow(22)
def test_two_steps_on_a_tiny_sd_pipeline_save_a_unet_that_reloads(tiny_sd, tmp_path):
    out = tmp_path / "run"
    r = run_script("pure.py", "--model", str(tiny_sd), "--concept", "church",
                        "--steps", "2", "--n-forget", "2", "--n-retain", "2", "--batch-size", "2",
                        "--n-eval-images", "0", "--output-dir", str(out), "--device", "cpu", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    changed = changed_parameters(out / "unet", tiny_sd / "unet")
    assert changed and any(".attn2." in n for n in changed)
    run = json.loads((out / "run.json").read_text())
    assert run["args"]["steps"] == 2 and run["base_model"] == str(tiny_sd)


@pytest.mark.slow(87)
def test_pure_defaults_forget_circle_at_seed_0_and_keep_the_other_shapes(quick_start):
    # the README's quick start is exactly this run: PURE with its default toy settings on circle,
    # seed 0 (the default seed); the other concepts and seeds are the benchmark's
    assert readme_quick_start()[0].endswith("python pure.py --model toy --concept circle")
    out = quick_start / "outputs" / "pure-circle"
    m = json.loads((out / "metrics.json").read_text())
    print(json.dumps(m, indent=1))
    assert m["n_forget_images"] >= 64 and m["n_retain_images"] >= 64
    assert m["seed"] == 0 and evaluation.meets_bar("pure", m), m["unlearned"]
    # the saved UNet plugs into the diffusers pipeline
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    pipe = StableDiffusionPipeline.from_pretrained(common.TOY_DIR / "pipeline", unet=unet, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a circle", num_inference_steps=5, output_type="pt").images
    assert img.shape == (1, 3, 32, 32)
    assert (out / "before_after.png").exists()
