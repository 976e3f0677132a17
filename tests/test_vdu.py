"""VDU: the stability term is the stated quadratic, precision has no infinities, runs save."""

import json

import pytest
import torch

import vdu
from conftest import run_script


def test_stability_is_zero_at_the_anchor_and_grows_quadratically():
    anchor = [torch.randn(5, 3), torch.randn(7)]
    precision = [torch.rand(5, 3) + 0.5, torch.rand(7) + 0.5]
    params = [a.clone() for a in anchor]
    assert vdu.stability(params, anchor, precision) == 0
    d = [torch.randn_like(a) for a in anchor]
    b1 = vdu.stability([a + 0.1 * x for a, x in zip(anchor, d)], anchor, precision)
    b2 = vdu.stability([a + 0.2 * x for a, x in zip(anchor, d)], anchor, precision)
    assert torch.allclose(b2, 4 * b1)
    # B = sum_i (theta_i - mu_i)^2 precision_i / 2
    expected = sum(((0.1 * x) ** 2 * w).sum() for x, w in zip(d, precision)) / 2
    assert torch.allclose(b1, expected)


def _run(tiny_sd, tmp_path, *extra):
    out = tmp_path / "run"
    r = run_script("vdu.py", "--model", str(tiny_sd), "--concept", "church",
                        "--steps", "2", "--n-forget", "2", "--batch-size", "2", "--n-eval-images", "0",
                        "--output-dir", str(out), "--device", "cpu", *extra, timeout=600)
    return r, out


@pytest.mark.slow(60)
def test_each_precision_source_runs_on_a_tiny_sd_pipeline_and_saves(tiny_sd, tmp_path):
    for source in ("l2", "fisher", "checkpoints"):
        extra = ["--checkpoints", str(tiny_sd), str(tiny_sd)] if source == "checkpoints" else []
        r, out = _run(tiny_sd, tmp_path / source, "--precision-from", source, "--fisher-samples", "2", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        run = json.loads((out / "run.json").read_text())
        assert run["args"]["precision_from"] == source


def test_identical_checkpoints_give_a_finite_precision_thanks_to_the_floor(tiny_sd):
    import common
    models = common.load_models(str(tiny_sd), torch.device("cpu"))
    params = common.select_trainable(models.unet, "full", verbose=False)
    anchor, precision = vdu.precision_and_anchor(models, params, "checkpoints", [str(tiny_sd)] * 2)
    flat = torch.cat([p.flatten() for p in precision])
    assert torch.isfinite(flat).all() and abs(flat.mean().item() - 1) < 1e-4


@pytest.mark.slow(35)
def test_unbounded_ascent_runs_away_on_the_toy_and_the_divergence_stop_saves_nothing(tmp_path):
    # measured: without the bound, gamma 0.5 sends A past 100x its start within ~20 steps
    out = tmp_path / "vdu-circle"
    r = run_script("vdu.py", "--model", "toy", "--concept", "circle", "--precision-from", "checkpoints",
                   "--gamma", "0.5", "--ascent-bound", "0", "--n-eval-images", "0", "--output-dir", out)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "the forget loss A ran away" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.slow(86)
def test_vdu_defaults_push_circle_out_and_keep_most_of_the_other_shapes(tmp_path):
    # The toy default (gamma 0.35) was chosen over 10 concepts x 3 seeds (docs/lab/searches/vdu_10_concepts.md);
    # this asserts what holds at every seed. Benchmark records, circle, seeds 0, 1, 2: UA 89, 53, 86%
    # (base 0-3%), in-domain retain drop 9.4, 4.7, 18.8 points. On most other concepts VDU forgets
    # less: this is not a claim that it meets its bar.
    out = tmp_path / "vdu-circle"
    r = run_script("vdu.py", "--model", "toy", "--concept", "circle", "--seed", "0", "--output-dir", out)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    print(json.dumps(m, indent=1))
    assert m["n_forget_images"] >= 64 and m["n_retain_images"] >= 64
    assert m["unlearned"]["ua"] >= 0.5 and m["base"]["ua"] <= 0.1, m
    assert m["unlearned"]["retain_in"] >= m["base"]["retain_in"] - 0.25, m


def test_t_min_draws_every_plasticity_timestep_at_or_above_it_and_is_range_checked(tiny_sd, tmp_path, monkeypatch):
    import common
    seen, real = [], common.add_noise

    def spy(scheduler, x0, generator=None, t=None, t_min=0):
        out = real(scheduler, x0, generator, t, t_min)
        seen.append(out[1].clone())
        return out
    monkeypatch.setattr(common, "add_noise", spy)
    vdu.main(["--model", str(tiny_sd), "--concept", "church", "--precision-from", "l2", "--steps", "4",
              "--n-forget", "4", "--batch-size", "4", "--t-min", "900", "--n-eval-images", "0",
              "--output-dir", str(tmp_path / "run"), "--device", "cpu"])
    t = torch.cat(seen)
    assert len(t) == 16 and t.min() >= 900 and len(set(t.tolist())) > 1
    try:
        vdu.parse_args(["--model", "toy", "--concept", "circle", "--t-min", "1000"])
        raise AssertionError("--t-min 1000 was accepted")
    except common.UsageError as e:
        assert str(e) == "--t-min must be a training timestep, in [0, 1000), got 1000."


def test_the_fisher_is_computed_in_float32_under_fp16(toy_models):
    import dataclasses
    import common
    # squared fp16 gradients, unscaled, underflow to 0: the Fisher's forward runs in float32
    unet = common.frozen_copy(toy_models.unet)
    models = dataclasses.replace(toy_models, unet=unet, dtype=torch.float16)
    params = common.select_trainable(unet, "xattn")
    seen = []
    unet.conv_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    _, precision = vdu.precision_and_anchor(models, params, "fisher", fisher_samples=2)
    fisher_calls = seen[-2:]  # after the sampler's forward passes: one per Fisher sample
    assert fisher_calls == [torch.float32, torch.float32]
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in precision)
