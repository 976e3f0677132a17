"""common.py: the sampler is the real thing, the SD path works, bad input fails clearly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import eval as ev

ROOT = Path(__file__).resolve().parents[1]


# --- the sampler ----------------------------------------------------------------------------

def test_deterministic_sampler_equals_diffusers_pipeline_on_toy(toy_models):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    prompts, seeds = ["a red circle", "a striped shape", "a box", ""], [0, 1, 2, 3]
    ours = common.sample(toy_models, prompts, seeds).images
    pipe = StableDiffusionPipeline.from_pretrained(common.TOY_DIR / "pipeline", safety_checker=None)
    pipe = pipe.to(toy_models.device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt",
                  num_inference_steps=toy_models.sample_steps, guidance_scale=toy_models.guidance_scale).images
    diff = ((ours + 1) / 2 - theirs.cpu()).abs().max().item()
    assert diff < 1e-4, f"max pixel difference to diffusers' pipeline: {diff}"


def test_ddim_step_with_eta_zero_equals_diffusers_scheduler_step(toy_models):
    sched = toy_models.scheduler
    sched.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    prev = common.previous_timesteps(sched.timesteps)
    for k in (0, 7, len(sched.timesteps) - 1):
        t = sched.timesteps[k]
        ours, _, _, _ = common.ddim_step(sched, eps, int(t), int(prev[k]), x_t, eta=0.0)
        theirs = sched.step(eps, t, x_t, eta=0.0).prev_sample
        assert torch.allclose(ours, theirs, atol=1e-6)


def test_stochastic_step_is_diffusers_step_and_its_log_prob_the_density_of_the_action(toy_models):
    sched = toy_models.scheduler
    sched.set_timesteps(20)
    g = torch.Generator().manual_seed(1)
    x_t, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t, t_prev = int(sched.timesteps[5]), int(sched.timesteps[6])
    x_prev, log_prob, _, _ = common.ddim_step(sched, eps, t, t_prev, x_t, eta=1.0,
                                              generators=[torch.Generator().manual_seed(s) for s in range(4)])
    # diffusers' own DDIM step, independent of ours: its mean (no noise), its sigma (unit noise)
    mean = sched.step(eps, t, x_t, eta=1.0, variance_noise=torch.zeros_like(x_t)).prev_sample
    sigma = sched.step(eps, t, x_t, eta=1.0, variance_noise=torch.ones_like(x_t)).prev_sample - mean
    assert sigma.min() > 0 and torch.allclose(sigma, sigma.flatten()[0].expand_as(sigma))
    # the drawn action is diffusers' step with the same per-image noise
    noise = torch.cat([torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in range(4)])
    assert torch.allclose(x_prev, sched.step(eps, t, x_t, eta=1.0, variance_noise=noise).prev_sample, atol=1e-5)
    expected = torch.distributions.Normal(mean, sigma).log_prob(x_prev).mean(dim=(1, 2, 3))
    assert torch.allclose(log_prob, expected, atol=1e-4)
    # moving every element one sigma away from the mean costs exactly 1/2 of log-density per element
    _, at_mean, _, _ = common.ddim_step(sched, eps, t, t_prev, x_t, eta=1.0, prev_sample=mean)
    _, one_sigma, _, _ = common.ddim_step(sched, eps, t, t_prev, x_t, eta=1.0, prev_sample=mean + sigma)
    assert torch.allclose(at_mean - one_sigma, torch.full((4,), 0.5), atol=1e-4)


def test_a_step_goes_where_it_is_told_whatever_the_scheduler_was_last_set_to(toy_models):
    # rl_critic.py re-scores stored steps long after sampling; the scheduler's own step count
    # (set by the last set_timesteps, an evaluation's say) must not enter the step
    sched = toy_models.scheduler
    g = torch.Generator().manual_seed(2)
    x_t, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    sched.set_timesteps(10)
    t, t_prev = int(sched.timesteps[3]), int(sched.timesteps[4])
    ten = common.ddim_step(sched, eps, t, t_prev, x_t, eta=1.0, prev_sample=x_t)
    sched.set_timesteps(50)
    fifty = common.ddim_step(sched, eps, t, t_prev, x_t, eta=1.0, prev_sample=x_t)
    assert all(torch.equal(a, b) for a, b in zip(ten, fifty))
    tensor_t = common.ddim_step(sched, eps, torch.tensor([t, t]), torch.tensor([t_prev, t_prev]), x_t, eta=1.0,
                                prev_sample=x_t)
    assert torch.allclose(tensor_t[1], ten[1], atol=1e-5)


def test_a_stochastic_last_step_has_a_finite_log_prob_even_with_set_alpha_to_one(toy_models):
    # set_alpha_to_one=True makes the final abar 1, so sigma_t of the last stochastic step would be
    # 0 and its log-probability NaN; like DDPO's sampler, a stochastic step ends at abar_0 instead
    from diffusers import DDIMScheduler
    sched = DDIMScheduler.from_config(toy_models.scheduler.config, set_alpha_to_one=True)
    sched.set_timesteps(10)
    t = int(sched.timesteps[-1])
    g = torch.Generator().manual_seed(3)
    x_t, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    x_prev, log_prob, _, sigma = common.ddim_step(sched, eps, t, -1, x_t, eta=1.0,
                                                  generators=[torch.Generator().manual_seed(s) for s in range(2)])
    assert sigma > 0 and torch.isfinite(log_prob).all() and torch.isfinite(x_prev).all()
    batched = common.ddim_step(sched, eps, torch.tensor([t, t]), torch.tensor([-1, -1]), x_t, eta=1.0,
                               prev_sample=x_prev)[1]
    assert torch.allclose(batched, log_prob, atol=1e-5)
    # deterministic sampling still ends where diffusers' does (at abar = 1)
    assert torch.allclose(common.ddim_step(sched, eps, t, -1, x_t)[0], sched.step(eps, t, x_t).prev_sample, atol=1e-6)


# --- the SD code path on a tiny random SD-architecture pipeline -------------------------------

def test_sd_path_loads_samples_and_selects_parameters_by_real_sd_names(tiny_sd):
    models = common.load_models(str(tiny_sd), torch.device("cpu"))
    assert not models.is_toy
    s = common.sample(models, ["a photo of a church", "a painting"], [0, 1], steps=3, guidance_scale=7.5)
    assert s.images.shape == (2, 3, 16, 16) and torch.isfinite(s.images).all()
    names = dict(models.unet.named_parameters())
    xattn = common.select_trainable(models.unet, "xattn")
    xattn_names = [n for n, p in models.unet.named_parameters() if p.requires_grad]
    assert xattn_names and all(".attn2." in n for n in xattn_names)
    assert {n.split(".attn2.")[1].split(".")[0] for n in xattn_names} == {"to_q", "to_k", "to_v", "to_out"}
    noxattn = common.select_trainable(models.unet, "noxattn")
    assert len(xattn) + len(noxattn) == len(names)
    assert not any(".attn2." in n for n, p in models.unet.named_parameters() if p.requires_grad)
    assert len(common.select_trainable(models.unet, "full")) == len(names)


def test_sd_prompt_sets_cover_objects_styles_and_nudity():
    class NotToy:
        is_toy, toy, erased = False, None, []
    van_gogh = common.concept_prompts("Van Gogh", NotToy())
    assert van_gogh.kind == "style" and all("Van Gogh" in p for p in van_gogh.forget)
    assert not any("Van Gogh" in p for p, _ in van_gogh.retain_in) and van_gogh.synonym
    church = common.concept_prompts("church", NotToy())
    assert church.kind == "object" and "a photo of a church" in church.forget
    assert common.concept_prompts("nudity", NotToy()).kind == "nudity"
    custom = common.concept_prompts("church", NotToy(), forget=["a cathedral"], retain=["a tree"])
    assert custom.forget == ["a cathedral"] and custom.retain == ["a tree"]


def test_a_row_of_the_concept_table_is_all_a_new_sd_concept_needs(monkeypatch):
    # one edit in one place: kind, synonym and judge label; the templates come with the kind
    monkeypatch.setitem(common.SD_CONCEPTS, "lighthouse", common.Concept("object", "beacon tower", 437))
    ps = common.prompt_set("Lighthouse", None)
    assert ps.concept == "lighthouse" and ps.kind == "object" and "a photo of a lighthouse" in ps.forget
    assert ps.synonym == [t.format("beacon tower") for t in common.TEMPLATES["object"]]
    assert common.concept_kind("lighthouse", "CompVis/stable-diffusion-v1-4") == "object"
    assert common.concept_kind("striped", "toy") == "texture"


def test_toy_prompt_sets_name_the_concept_only_in_forget_prompts(toy_models):
    ps = common.concept_prompts("circle", toy_models)
    assert ps.kind == "shape" and all("circle" in p for p in ps.forget)
    assert not any("circle" in p for p in ps.retain) and all("disc" in p for p in ps.synonym)
    assert {v for _, v in ps.retain_in} == {"square", "triangle", "cross", "diamond", "ring"}
    assert {k for _, k, _ in ps.retain_cross} == {"colour", "texture"}


# --- bad input: one clear sentence, nothing written --------------------------------------------

def test_unknown_toy_concept_is_a_clear_error_listing_the_toy_concepts(toy_models):
    with pytest.raises(common.UsageError, match="shapes: circle, square.*textures: solid"):
        common.concept_prompts("hexagon", toy_models)
    with pytest.raises(common.UsageError, match="synonym of 'circle'"):
        common.concept_prompts("disc", toy_models)


def test_unknown_word_in_a_toy_prompt_is_a_clear_error(toy_models):
    with pytest.raises(common.UsageError, match="does not know the word.*'hexagon'.*shapes: circle"):
        common.encode_prompts(toy_models, ["a red hexagon"])


def test_empty_concept_is_a_clear_error(toy_models):
    with pytest.raises(common.UsageError, match="--concept is empty"):
        common.concept_prompts("  ", toy_models)


@pytest.mark.slow(20)
def test_unreachable_hub_model_offline_fails_with_one_sentence_naming_it(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "eval.py", "--model", "someone/not-a-cached-model",
                        "--concept", "church", "--device", "cpu"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert "someone/not-a-cached-model" in err and "--model toy" in err


def test_existing_output_folder_is_refused_without_overwrite_and_left_untouched(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(common.UsageError, match="--overwrite"):
        with common.output_folder(out):
            pass
    assert (out / "keep.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_failed_run_leaves_nothing_and_overwrite_replaces_atomically(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with common.output_folder(out) as tmp:
            (tmp / "half.txt").write_text("half-written")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with common.output_folder(out) as tmp:
        (tmp / "a.txt").write_text("1")
    with common.output_folder(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]


def test_non_finite_loss_stops_the_run_and_nothing_is_saved(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(common.UsageError, match="became nan at step 3.*nothing was saved"):
        with common.output_folder(out) as tmp:
            (tmp / "partial").write_text("x")
            common.check_finite(3, loss=torch.tensor(float("nan")))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_empty_parameter_selection_is_an_error():
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 32), layers_per_block=1,
                                down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2D",
                                norm_num_groups=16, cross_attention_dim=32)
    with pytest.raises(common.UsageError, match="selects no parameter"):
        common.select_trainable(unet, "xattn")
    with pytest.raises(common.UsageError, match="unknown --train"):
        common.select_trainable(unet, "attention")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_an_error_not_a_silent_fallback():
    with pytest.raises(common.UsageError, match="no CUDA GPU"):
        common.seed_and_device(0, "cuda")
    with pytest.raises(common.UsageError, match="fp16 needs a CUDA GPU"):
        common.seed_and_device(0, "cpu", "fp16")


def test_args_dataclass_becomes_a_command_line_with_help():
    from dataclasses import dataclass

    @dataclass
    class A:
        concept: str = common.arg("circle", "what to forget")
        steps: int = common.arg(None, "optimiser steps")
        anchor: bool = common.arg(True, "keep the anchor")
        prompts: list[str] = common.arg([], "prompts")

    a = common.parse_args(A, ["--concept", "ring", "--no-anchor", "--prompts", "a b", "c"])
    assert (a.concept, a.steps, a.anchor, a.prompts) == ("ring", None, False, ["a b", "c"])
    common.fill_defaults(a, {"steps": 40})
    assert a.steps == 40


# --- metrics on hand-made cases -----------------------------------------------------------------

def test_a_judge_that_is_always_right_gives_retain_one_and_ua_zero():
    concept, truth = "circle", ["circle"] * 10
    assert ev.unlearning_accuracy(truth, concept) == 0.0
    assert ev.retain_accuracy(["square", "ring"], ["square", "ring"]) == 1.0
    assert ev.unlearning_accuracy(["square"] * 3 + ["circle"], concept) == 0.75
    assert ev.retain_accuracy(["square", "other"], ["square", "ring"]) == 0.5


def test_frechet_distance_is_zero_for_identical_features_and_the_mean_shift_otherwise():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=g)
    assert abs(ev.frechet_distance(a, a)) < 1e-6
    shift = torch.zeros(8)
    shift[0] = 3.0
    assert abs(ev.frechet_distance(a, a + shift) - 9.0) < 1e-4


def test_frechet_distance_with_different_covariances_matches_two_independent_computations():
    import numpy as np
    g = torch.Generator().manual_seed(1)
    # 1-D: b = 2a + 1 has mean 2 mu_a + 1 and std 2 sigma_a: FD = (mu_a + 1)^2 + (2 sigma_a - sigma_a)^2
    a = torch.randn(300, 1, generator=g)
    assert abs(ev.frechet_distance(a, 2 * a + 1) - ((a.mean().item() + 1) ** 2 + a.var().item())) < 1e-6
    # d-D: tr(S_a + S_b - 2 (S_a S_b)^1/2), the cross term from the eigenvalues of S_a S_b
    a = torch.randn(400, 6, generator=g) @ torch.randn(6, 6, generator=g)
    b = torch.randn(400, 6, generator=g) @ torch.randn(6, 6, generator=g) + 0.5
    s_a, s_b = np.cov(a.numpy().T), np.cov(b.numpy().T)
    cross = np.sqrt(np.linalg.eigvals(s_a @ s_b).real.clip(min=0)).sum()
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum().item() + np.trace(s_a) + np.trace(s_b) - 2 * cross
    assert abs(ev.frechet_distance(a, b) - expected) < 1e-6 * max(1.0, abs(expected))


# --- every number is checked, every script has --help, every stop leaves nothing ------------------

def test_numbers_out_of_their_declared_range_are_one_sentence_errors():
    from dataclasses import dataclass

    @dataclass
    class A:
        steps: int = common.arg(10, "steps", ">=1")
        lr: float = common.arg(1e-3, "learning rate", ">0")
        gamma: float = common.arg(0.5, "weight", "(0,1)")
        share: float = common.arg(1.0, "share", "(0,1]")
        free: float = common.arg(-3.0, "no range, only finite")

    common.check_ranges(A())
    for field, value, message in [("steps", -5, "--steps must be at least 1, got -5."),
                                  ("lr", float("nan"), "--lr must be a finite number, got nan."),
                                  ("lr", 0.0, "--lr must be greater than 0, got 0.0."),
                                  ("gamma", 1.0, "--gamma must be in (0, 1), got 1.0."),
                                  ("share", 0.0, "--share must be in (0, 1], got 0.0."),
                                  ("free", float("inf"), "--free must be a finite number, got inf.")]:
        with pytest.raises(common.UsageError) as e:
            common.check_ranges(A(**{field: value}))
        assert str(e.value) == message


@pytest.mark.slow(12)
def test_bad_numbers_on_a_method_command_line_exit_2_with_one_sentence():
    for argv, message in [(["--lr", "nan"], "error: --lr must be a finite number, got nan."),
                          (["--steps", "-5"], "error: --steps must be at least 1, got -5.")]:
        r = subprocess.run([sys.executable, "pure.py", "--model", "toy", "--concept", "circle", *argv],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.strip() == message, r.stderr


@pytest.mark.parametrize("script", ["pure.py", "mim_mu.py", "vdu.py", "rl_critic.py", "eval.py",
                                    "baselines/esd.py", "baselines/salun.py",
                                    "benchmarks/compare_toy.py", "benchmarks/search_toy.py", "benchmarks/sampling_speed.py",
                                    "benchmarks/sd_memory.py", "benchmarks/gpu_check.py",
                                    "benchmarks/probes/exploration_by_guidance.py",
                                    "benchmarks/probes/critic_input_ablation.py",
                                    "benchmarks/probes/gradient_agreement_by_step.py",
                                    "benchmarks/probes/guidance_branch_damage.py",
                                    "benchmarks/probes/text_entanglement.py",
                                    "benchmarks/probes/judge_agreement.py",
                                    "benchmarks/probes/salun_retain_drift.py", "attack.py",
                                    "benchmarks/probes/attack_budget.py",
                                    "benchmarks/probes/vdu_search.py"])
def test_every_script_has_a_help_that_parses(script, monkeypatch, capsys):
    # run as `python <script> --help` would, in this interpreter (a new one per script spent 2 s
    # importing torch each time); the method scripts' command lines are run for real elsewhere
    import runpy
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    out = capsys.readouterr().out
    assert e.value.code in (0, None) and out.startswith("usage:"), out[-2000:]
    assert len(out.splitlines()) > 5


def test_a_missing_forget_images_folder_is_one_sentence(tmp_path):
    with pytest.raises(common.UsageError, match="--forget-images .* is not a folder"):
        common.load_image_folder(str(tmp_path / "nowhere"), 32)


def test_sigterm_stops_a_run_like_ctrl_c_and_leaves_nothing(tmp_path):
    import signal
    import time
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "pure.py", "--model", "toy", "--concept", "circle", "--n-eval-images", "0",
                          "--output-dir", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(tmp_path.iterdir()) and time.time() < deadline:  # the hidden temporary folder
        time.sleep(0.1)
    assert any(tmp_path.iterdir()), "the run never started"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "nothing was saved" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_sigterm_whose_interrupt_was_swallowed_still_saves_nothing(tmp_path):
    # Python raises SIGTERM's KeyboardInterrupt wherever the main thread is; inside a finalizer it is
    # printed and dropped, and the run goes on to the end. The output folder must then not appear.
    common.STOP_REQUESTED.set()
    try:
        steps = []
        with pytest.raises(KeyboardInterrupt):  # every training loop stops at its next step
            for step in common.progress(3, "training"):
                steps.append(step)
        assert steps == []
        with pytest.raises(KeyboardInterrupt):
            with common.output_folder(tmp_path / "run") as folder:
                (folder / "metrics.json").write_text("{}")
    finally:
        common.STOP_REQUESTED.clear()
    assert list(tmp_path.iterdir()) == []


def test_steps_the_fp16_scaler_skips_are_counted_and_recorded(toy_models, tmp_path):
    import pure
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler, before = common.loss_scaler("fp16", torch.device("cpu")), common.LossScaler.skipped
    for value in (1.0, float("inf"), 2.0):  # the second step overflows
        opt.zero_grad()
        scaler.scale((p * value).sum()).backward()
        scaler.step(opt)
        scaler.update()
    assert common.LossScaler.skipped - before == 1
    args = pure.parse_args(["--model", "toy", "--concept", "circle", "--mixed-precision", "fp16"])
    run = common.save_run(tmp_path, common.frozen_copy(toy_models.unet), args, toy_models, 0.0)
    assert run["fp16_skipped_steps"] == common.LossScaler.skipped >= 1


@pytest.mark.parametrize("cls,word", [("StableDiffusion3Pipeline", "SD3"), ("FluxPipeline", "FLUX")])
def test_sd3_and_flux_folders_are_refused_in_one_sentence_before_anything_loads(tmp_path, cls, word):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": cls}))  # nothing else: no weights
    with pytest.raises(common.UsageError) as e:
        common.load_models(str(tmp_path), torch.device("cpu"))
    message = str(e.value)
    assert message.startswith(f"{tmp_path} is a {cls}: {word}") and ". " not in message, message
    assert common.pipeline_class(str(tmp_path)) == cls and common.pipeline_class("toy/pipeline") is not None


def test_a_repeated_concept_gives_several_and_a_flag_is_never_abbreviated():
    import pure
    assert pure.parse_args(["--model", "toy", "--concept", "circle", "--concept", "striped"]).concept == \
        "circle + striped"  # argparse alone kept the last, silently erasing one concept of two
    assert pure.parse_args(["--model", "toy", "--concept=circle"]).concept == "circle"
    with pytest.raises(SystemExit):  # no abbreviations: "--conc" is not a second --concept
        pure.parse_args(["--model", "toy", "--concept", "circle", "--conc", "striped"])
