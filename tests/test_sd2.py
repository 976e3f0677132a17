"""Stable Diffusion 2.x: v-prediction in the DDIM step, the noising target and the methods, and
the scheduler settings the code refuses rather than mis-sample."""

import json

import pytest
import torch

import common
from conftest import SD2_SCHEDULER, changed_parameters, make_tiny_sd, run_script


def _pipeline_images(folder, prompts, seeds, steps, guidance):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt",
                num_inference_steps=steps, guidance_scale=guidance).images


@pytest.mark.parametrize("alpha_to_one", [False, True])
def test_the_sampler_equals_diffusers_pipeline_on_a_tiny_v_prediction_model(tmp_path, alpha_to_one):
    folder = make_tiny_sd(tmp_path, **{**SD2_SCHEDULER, "set_alpha_to_one": alpha_to_one})
    models = common.load_models(str(folder), torch.device("cpu"))
    assert models.scheduler.config.prediction_type == "v_prediction"
    prompts, seeds = ["a photo of a church", "a painting by Monet", ""], [0, 1, 2]
    ours = common.sample(models, prompts, seeds, steps=10, guidance_scale=7.5).images
    theirs = _pipeline_images(folder, prompts, seeds, 10, 7.5)
    assert ((ours + 1) / 2 - theirs).abs().max() < 1e-4


def test_a_stochastic_v_step_is_diffusers_step_and_its_log_prob_the_density(tiny_sd2):
    models = common.load_models(str(tiny_sd2), torch.device("cpu"))
    sched = models.scheduler
    sched.set_timesteps(20)
    g = torch.Generator().manual_seed(1)
    x_t, v = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t, t_prev = int(sched.timesteps[4]), int(sched.timesteps[5])
    noise = torch.cat([torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in range(3)])
    x_prev, log_prob, mean, sigma = common.ddim_step(sched, v, t, t_prev, x_t, eta=1.0,
                                                     generators=[torch.Generator().manual_seed(s) for s in range(3)])
    assert torch.allclose(x_prev, sched.step(v, t, x_t, eta=1.0, variance_noise=noise).prev_sample, atol=1e-5)
    assert torch.allclose(mean, sched.step(v, t, x_t, eta=1.0, variance_noise=torch.zeros_like(x_t)).prev_sample,
                          atol=1e-5)
    expected = torch.distributions.Normal(mean, sigma).log_prob(x_prev).mean(dim=(1, 2, 3))
    assert torch.allclose(log_prob, expected, atol=1e-4)
    assert torch.allclose(common.ddim_step(sched, v, t, t_prev, x_t)[0], sched.step(v, t, x_t, eta=0.0).prev_sample, atol=1e-5)


def test_the_noising_target_is_v_and_the_split_recovers_eps_and_x0(tiny_sd2):
    sched = common.load_models(str(tiny_sd2), torch.device("cpu")).scheduler
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([10, 300, 600, 990])
    x_t, _, target = common.add_noise(sched, x0, torch.Generator().manual_seed(5), t=t)
    # the eps add_noise drew, rebuilt from x_t
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
    assert torch.allclose(target, sched.get_velocity(x0, eps, t), atol=1e-5)  # diffusers' own v
    eps_hat, x0_hat = common.split_prediction(sched, target, t, x_t)
    assert torch.allclose(eps_hat, eps, atol=1e-4) and torch.allclose(x0_hat, x0, atol=1e-4)


@pytest.mark.parametrize("setting,message", [
    ({"clip_sample": True}, "sets clip_sample=True, which the DDIM step here does not implement"),
    ({"thresholding": True}, "sets thresholding=True"),
    ({"prediction_type": "sample"}, "predicts 'sample'; these methods handle epsilon and v_prediction")])
def test_a_scheduler_setting_the_code_does_not_handle_is_refused_in_one_sentence(tiny_sd, tmp_path, setting, message):
    import shutil
    folder = tmp_path / "model"
    shutil.copytree(tiny_sd, folder)  # then the setting is written into its scheduler config
    config = folder / "scheduler" / "scheduler_config.json"  # (the pipeline itself would "fix" clip_sample)
    config.write_text(json.dumps({**json.loads(config.read_text()), **setting}))
    with pytest.raises(common.UsageError, match=message):
        common.load_models(str(folder), torch.device("cpu"))


@pytest.mark.slow(17)
@pytest.mark.parametrize("script", ["pure.py", "rl_critic.py"])
def test_two_steps_on_a_tiny_v_prediction_pipeline_save_a_unet_that_reloads_in_half_precision_too(tiny_sd2, tmp_path,
                                                                                                  script):
    # PURE trains on the noising target (v here), CGRU on DDIM log-probabilities of v outputs
    out = tmp_path / "run"
    extra = (["--steps", "2", "--n-forget", "2", "--n-retain", "2", "--batch-size", "2", "--save-half"]
             if script == "pure.py" else
             ["--iterations", "2", "--samples-per-iteration", "4", "--sample-steps", "3", "--minibatch", "4",
              "--warmup-epochs", "2", "--critic-epochs", "1", "--clip-model", str(common.TOY_DIR / "clip"),
              "--lr", "1e-3", "--clip-range", "0.2"])
    r = run_script(script, "--model", str(tiny_sd2), "--concept", "church", *extra, "--n-eval-images", "0",
                   "--output-dir", str(out), "--device", "cpu", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert changed_parameters(out / "unet", tiny_sd2 / "unet")
    assert json.loads((out / "run.json").read_text())["base_model"] == str(tiny_sd2)
    if script == "pure.py":  # --save-half: a float16 UNet of half the size that plain diffusers loads
        from diffusers import UNet2DConditionModel
        from safetensors import safe_open
        size = lambda folder: sum(p.stat().st_size for p in folder.glob("*.safetensors"))  # noqa: E731
        assert 0.45 < size(out / "unet") / size(tiny_sd2 / "unet") < 0.55
        with safe_open(next((out / "unet").glob("*.safetensors")), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        unet = UNet2DConditionModel.from_pretrained(out / "unet", torch_dtype=torch.float16)
        assert next(unet.parameters()).dtype == torch.float16
        assert common.load_unet(out / "unet").dtype == torch.float32  # the project's loader casts it back




@pytest.mark.slow(5)
def test_sampling_in_chunks_gives_the_same_images_and_sd_samples_8_prompts_at_a_time(toy_models, tiny_sd):
    prompts, seeds = ["a circle", "a red square", "a striped shape", "", "a ring"], [4, 3, 2, 1, 0]
    whole = common.sample(toy_models, prompts, seeds).latents
    chunked = common.sample(toy_models, prompts, seeds, batch_size=2).latents
    # equal up to float rounding (a batch of another size sums in another order)
    assert toy_models.sample_batch_size == 64 and (whole - chunked).abs().max() < 1e-4
    assert common.load_models(str(tiny_sd), torch.device("cpu")).sample_batch_size == 8
    assert common.load_models(str(tiny_sd), torch.device("cpu"), sample_batch_size=2).sample_batch_size == 2


@pytest.mark.slow(11)
def test_fp16_loss_scaling_is_undone_before_clipping_and_an_overflowing_step_is_skipped(tiny_sd, monkeypatch):
    # fp16 autocast needs a GPU; the scaler's arithmetic does not, so a CPU GradScaler stands in for it
    import pure

    def train_with(scaler):
        monkeypatch.setattr(common, "loss_scaler", lambda mixed_precision, device: scaler)
        args = pure.parse_args(["--model", str(tiny_sd), "--concept", "church", "--steps", "2", "--n-forget", "2",
                                "--n-retain", "2", "--batch-size", "2", "--lr", "1e-2", "--grad-clip", "1e-3",
                                "--device", "cpu"])
        models, ps, unet_ref, params = pure.setup(args)
        data = pure.make_data(args, models, ps)
        start = [p.detach().clone() for p in params]
        pure.train(args, models, unet_ref, params, data)
        return start, [p.detach().clone() for p in params]

    start, plain = train_with(torch.amp.GradScaler("cpu", enabled=False))
    _, scaled = train_with(torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    # the loss was scaled 4096x, and unscaled before clipping: the same steps as without scaling
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(plain, scaled))
    assert any(not torch.equal(a, b) for a, b in zip(start, plain))
    # a scale that overflows: every step is skipped, nothing moves
    _, skipped = train_with(torch.amp.GradScaler("cpu", init_scale=float("inf")))
    assert all(torch.equal(a, b) for a, b in zip(start, skipped))
