"""VDU in its own setting: a class forgotten by an unconditional model (toy-uncond)."""

import json

import pytest
import torch

import common
import eval as evaluation
import vdu
from conftest import run_script


@pytest.mark.slow(8)
def test_the_unconditional_sampler_equals_diffusers_ldm_pipeline(tiny_uncond):
    from diffusers import LDMPipeline
    models = common.load_models(str(tiny_uncond), torch.device("cpu"), unconditional_ok=True)
    assert not models.conditional and models.tokenizer is None
    seeds = [3, 4, 5]
    ours = common.sample(models, [""] * 3, seeds, steps=10).images
    pipe = LDMPipeline.from_pretrained(tiny_uncond)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=3, generator=[torch.Generator().manual_seed(s) for s in seeds],
                  num_inference_steps=10, eta=0.0, output_type="np").images
    theirs = torch.from_numpy(theirs).permute(0, 3, 1, 2)
    assert (ours / 2 + 0.5 - theirs).abs().max() < 1e-4


def test_the_class_set_is_the_class_s_images_in_every_colour_and_texture(toy_models):
    # the forget set of the class setting: the class's own images (the judge reads them as the class)
    x0 = common.class_set(toy_models, "triangle", 48, seed=0)
    images = common.decode_latents(toy_models, x0)
    answers = evaluation.Judge(toy_models)(images, "shape")
    share = sum(a == "triangle" for a in answers) / len(answers)
    assert share >= 0.9, answers
    again = common.class_set(toy_models, "triangle", 48, seed=0)
    other_seed = common.class_set(toy_models, "triangle", 48, seed=1)
    assert x0.shape == again.shape and not torch.equal(x0, other_seed)


def test_without_a_stability_term_the_loss_is_the_ascent_alone_with_no_text(tiny_uncond):
    models = common.load_models(str(tiny_uncond), torch.device("cpu"), unconditional_ok=True)
    unet_ref = common.frozen_copy(models.unet)
    params = common.select_trainable(models.unet, "full", verbose=False)
    x0 = torch.randn(4, 4, 8, 8)
    x_t, t, eps = common.add_noise(models.scheduler, x0, torch.Generator().manual_seed(0))
    batch = (x_t, t, eps, None, torch.ones(4))
    anchor = [p.detach().clone() for p in params]
    for p in params[:1]:
        p.data += 0.01   # away from the anchor, so B is not 0
    total, terms = vdu.loss(models.unet, unet_ref, models, batch, params, anchor, [torch.ones_like(p) for p in params],
                            gamma=0.0, bound=0.0)
    assert terms["B"] > 0 and torch.equal(total, -terms["A"])   # L = -(1 - 0) A + 0 B
    expected = (models.unet(x_t, t).sample - eps).pow(2).mean()
    assert torch.allclose(terms["A"], expected)
    # one step of gradient descent on L raises A: the ascent's sign
    opt = torch.optim.SGD(params, lr=1e-3)
    total.backward()
    opt.step()
    after, _ = vdu.loss(models.unet, unet_ref, models, batch, params, anchor, [torch.ones_like(p) for p in params],
                        gamma=0.0, bound=0.0)
    assert -after > terms["A"]


def test_the_class_bar():
    share = {"circle": 0.16, "square": 0.16, "triangle": 0.2, "cross": 0.16, "diamond": 0.16, "ring": 0.16,
             "other": 0.0}
    base = {"share": share, "fd_clip": 5.0}
    def metrics(**new):
        return {"concept": "circle", "base": base,
                "unlearned": {"share": {**share, **new.get("share", {})}, "fd_clip": new.get("fd", 4.0)}}
    assert evaluation.meets_class_bar(metrics(share={"circle": 0.016}))
    assert not evaluation.meets_class_bar(metrics(share={"circle": 0.017}))            # above a tenth
    assert not evaluation.meets_class_bar(metrics(share={"circle": 0.0, "triangle": 0.149}))  # lost > 1/4
    assert evaluation.meets_class_bar(metrics(share={"circle": 0.0, "triangle": 0.15}))
    assert not evaluation.meets_class_bar(metrics(share={"circle": 0.0}, fd=5.1))       # past the noise


@pytest.mark.slow(25)
def test_vdu_on_an_unconditional_model_saves_a_run_that_diffusers_loads(tiny_uncond, tmp_path):
    from diffusers import LDMPipeline, UNet2DModel
    out = tmp_path / "run"
    r = run_script("vdu.py", "--model", str(tiny_uncond), "--concept", "circle", "--steps", "2", "--n-forget", "4",
                   "--batch-size", "2", "--fisher-samples", "2", "--n-eval-images", "16", "--gamma", "0",
                   "--output-dir", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["kind"] == "class" and m["n_images"] == 16
    for model in ("base", "unlearned"):
        assert abs(sum(m[model]["share"].values()) - 1) < 1e-9
        classes = json.loads((common.TOY_DIR / "toy.json").read_text())["vocabulary"]["classes"]["shape"]
        assert list(m[model]["share"]) == classes   # the six shapes and "other"
    assert "meets_class_bar" in m and json.loads((out / "run.json").read_text())["args"]["gamma"] == 0
    unet = UNet2DModel.from_pretrained(out / "unet")
    pipe = LDMPipeline.from_pretrained(tiny_uncond, unet=unet)
    pipe.set_progress_bar_config(disable=True)
    assert pipe(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)
    # eval.py --run evaluates it again, from the run folder alone
    r = run_script("eval.py", "--run", out, "--n-images", "8", "--device", "cpu")
    assert r.returncode == 0 and "unconditional samples per row" in r.stdout, r.stderr[-3000:]


@pytest.mark.slow(20)
def test_bad_input_in_the_class_setting_is_one_sentence(tiny_uncond, tmp_path):
    r = run_script("pure.py", "--model", str(tiny_uncond), "--concept", "circle", "--output-dir", tmp_path / "p")
    assert r.returncode == 2 and "unconditional model" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_script("vdu.py", "--model", str(tiny_uncond), "--concept", "striped", "--output-dir", tmp_path / "v")
    assert r.returncode == 2 and "a texture" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "v").exists()
    with pytest.raises(common.UsageError, match="no cross-attention"):
        vdu.parse_args(["--model", "toy-uncond", "--concept", "circle", "--train", "xattn"])
