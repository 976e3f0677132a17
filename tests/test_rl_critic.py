"""CGRU: GAE's closed forms, PPO's clip, a critic that explains the reward, forgetting on the toy."""

import json

import pytest
import torch

import common
import eval as evaluation
from conftest import changed_parameters, run_script
import rl_critic


def test_gae_with_lambda_zero_and_one_gives_the_two_closed_forms():
    values = torch.tensor([[0.1, 0.4, -0.2, 0.7]])  # V(s_t), noisiest state first
    r = torch.tensor([1.5])
    # lambda = 0: A_t = V(s_{t-1}) - V(s_t), the last step's "next value" being r
    a0 = rl_critic.gae(values, r, 0.0)
    assert torch.allclose(a0, torch.tensor([[0.3, -0.6, 0.9, 0.8]]))
    # lambda = 1: A_t = r - V(s_t)
    a1 = rl_critic.gae(values, r, 1.0)
    assert torch.allclose(a1, r[:, None] - values)
    # in between: the recursion A_t = delta_t + lambda A_{t-1}
    a5 = rl_critic.gae(values, r, 0.5)
    assert torch.allclose(a5[0, 2], a0[0, 2] + 0.5 * a0[0, 3])


def test_ppo_clip_stops_the_push_once_the_ratio_leaves_the_trust_region():
    old = torch.zeros(3)
    new = torch.tensor([0.0, 0.1, -0.1], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0])
    loss, ratio = rl_critic.ppo_loss(new, old, adv, clip_range=0.05)
    loss.backward()
    # inside the region the gradient raises the log-prob of a positive-advantage action;
    # outside it (ratio 1.105 with A > 0, ratio 0.905 with A < 0) there is no gradient
    assert new.grad[0] < 0 and new.grad[1] == 0 and new.grad[2] == 0


def test_stored_trajectories_rescore_to_their_own_log_probs_under_the_same_policy(toy_models):
    # what PPO relies on: before any update, re-scoring a stored action gives ratio 1
    prompts = ["a circle", "a ring"]
    s = rl_critic.sample_trajectories(toy_models, prompts, [0, 1], 5, toy_models.guidance_scale, eta=1.0)
    assert s["x_t"].shape == (2, 5, 4, 8, 8) and s["log_probs"].shape == (2, 5)
    cond, uncond = common.encode_prompts(toy_models, prompts), common.encode_prompts(toy_models, ["", ""])
    with torch.no_grad():
        prev = common.previous_timesteps(s["timesteps"]).tolist()
        for k, t in enumerate(s["timesteps"].tolist()):
            eps = common.guided_eps(toy_models.unet, s["x_t"][:, k], t, cond, uncond, toy_models.guidance_scale)
            _, log_prob, _, _ = common.ddim_step(toy_models.scheduler, eps, t, prev[k], s["x_t"][:, k], eta=1.0,
                                                 prev_sample=s["x_prev"][:, k])
            assert torch.allclose(log_prob, s["log_probs"][:, k], atol=1e-4), k
    # the last action is the final latent: decoding it gives the images
    assert torch.allclose(common.decode_latents(toy_models, s["x_prev"][:, -1]), s["images"])


def test_trajectories_recorded_batch_by_batch_are_the_trajectories_of_one_batch(toy_models):
    import dataclasses
    prompts, seeds = ["a circle", "a ring", "a red square"], [3, 4, 5]
    one = rl_critic.sample_trajectories(toy_models, prompts, seeds, 3, 1.0, eta=1.0)
    small = dataclasses.replace(toy_models, sample_batch_size=2)  # batches of 2, then 1
    two = rl_critic.sample_trajectories(small, prompts, seeds, 3, 1.0, eta=1.0)
    assert one["x_t"].shape == (3, 3, 4, 8, 8) and one["log_probs"].shape == (3, 3)
    for k in ("x_t", "x_prev", "x0_hat", "log_probs", "images"):
        assert torch.allclose(one[k], two[k], atol=1e-5), k


def test_ppo_trains_only_the_noisiest_share_of_each_trajectory(toy_models):
    import dataclasses
    models = dataclasses.replace(toy_models, unet=common.frozen_copy(toy_models.unet).requires_grad_(False))
    params = common.select_trainable(models.unet, "xattn", verbose=False)
    args = rl_critic.parse_args(["--model", "toy", "--concept", "circle", "--train-steps", "0.5",
                                 "--lr", "1e-2", "--minibatch", "8", "--clip-range", "0.2",
                                 "--kl-weight", "0", "--guidance-scale", str(models.guidance_scale)])  # PPO alone
    s = rl_critic.sample_trajectories(models, ["a circle", "a red square"], [1, 2], 4, models.guidance_scale, eta=1.0)
    roll = dict(prompts=["a circle", "a red square"], is_forget=torch.tensor([True, False]), **s)
    before = [p.detach().clone() for p in params]
    moved = lambda: any(not torch.equal(p, q) for p, q in zip(params, before))  # noqa: E731

    # advantages only on the two least noisy of 4 steps: nothing trains on them, nothing moves
    adv = torch.zeros(2, 4)
    adv[:, 2:] = 3.0
    rl_critic.policy_update(args, models, None, params, torch.optim.Adam(params, lr=1e-2),
                            [dict(roll, adv=adv)], torch.Generator().manual_seed(0))
    assert not moved()
    # an advantage on the second noisiest step alone does move theta
    adv = torch.zeros(2, 4)
    adv[:, 1] = 3.0
    rl_critic.policy_update(args, models, None, params, torch.optim.Adam(params, lr=1e-2),
                            [dict(roll, adv=adv)], torch.Generator().manual_seed(0))
    assert moved()


def test_kl_holds_the_retain_prompts_and_the_unconditional_branch_but_not_the_forget_prompts(toy_models):
    import dataclasses
    unet_ref = toy_models.unet
    models = dataclasses.replace(toy_models, unet=common.frozen_copy(unet_ref).requires_grad_(False))
    params = common.select_trainable(models.unet, "xattn", verbose=False)
    with torch.no_grad():  # theta starts away from the reference
        g = torch.Generator().manual_seed(0)
        for p in params:
            p.add_(1e-2 * torch.randn(p.shape, generator=g))
    args = rl_critic.parse_args(["--model", "toy", "--concept", "circle", "--kl-weight", "100",
                                 "--kl-uncond", "--minibatch", "8", "--train-steps", "1"])
    s = rl_critic.sample_trajectories(models, ["a circle", "a red square"], [1, 2], 4, args.guidance_scale, eta=1.0)
    adv = torch.zeros(2, 4)  # no advantage: only the KL terms can move theta
    ref, trained = dict(unet_ref.named_parameters()), dict(models.unet.named_parameters())
    names = [n for n, p in trained.items() if p.requires_grad]
    distance = lambda: sum((trained[n] - ref[n]).pow(2).sum() for n in names).item()  # noqa: E731

    def update(is_forget):
        roll = dict(prompts=["a circle", "a red square"], is_forget=torch.tensor(is_forget), **s)
        return rl_critic.policy_update(args, models, unet_ref, params, torch.optim.SGD(params, lr=1e-4),
                                       [dict(roll, adv=adv)], torch.Generator().manual_seed(0))

    start = distance()
    stats = update([True, True])  # forget prompts only: the policy's KL is off, the unconditional one on
    assert stats["kl"] == 0 and stats["kl_uncond"] > 0
    assert distance() < start  # and it pulls theta toward the reference
    stats = update([True, False])  # a retain prompt: its policy is held too
    assert stats["kl"] > 0


def test_critic_fitted_on_trajectories_explains_the_rewards_of_held_out_ones():
    # Each trajectory ends in a feature z that fixes its reward; the states are views of z whose
    # noise shrinks along the trajectory (noisiest first), as the CLIP features of x_t do.
    g = torch.Generator().manual_seed(0)
    T, d = 10, 16

    def trajectories(n):  # as critic_rows: one row per state, the trajectory's reward its target
        z = torch.randn(n, d, generator=g)
        noise = torch.linspace(3.0, 0.05, T)[None, :, None] * torch.randn(n, T, d, generator=g)
        return rl_critic.critic_rows(z[:, None] + noise, torch.linspace(951, 1, T).long(),
                                     torch.randn(n, d, generator=g), 3 * torch.nn.functional.normalize(z, dim=-1)[:, 0])

    torch.manual_seed(0)
    critic = rl_critic.Critic(d, d)
    opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
    train, held_out = trajectories(512), trajectories(256)
    rl_critic.fit_critic(critic, opt, [train], 20, g, "cpu")
    # fit_critic reports the MSE on the newest rollout before fitting on it: here, held-out data
    val_mse = rl_critic.fit_critic(critic, opt, [train, held_out], 0, g, "cpu")
    h, t, text, target = held_out
    assert val_mse < 0.8 * target.view(-1, T)[:, 0].var()  # measured: 0.36 against a variance of 0.57
    with torch.no_grad():
        err = ((critic(h, t, text) - target) ** 2).view(-1, T)
    assert err[:, -3:].mean() < 0.5 * err[:, :3].mean()  # the less noisy the state, the better the value


def test_critic_film_starts_as_identity_and_depends_on_t_after_training():
    critic = rl_critic.Critic(8, 8)
    h, text = torch.randn(16, 8), torch.randn(16, 8)
    t1, t2 = torch.full((16,), 900), torch.full((16,), 50)
    assert torch.allclose(critic(h, t1, text), critic(h, t2, text))
    ablated = rl_critic.Critic(8, 8, film=False)
    opt = torch.optim.Adam(list(critic.parameters()) + list(ablated.parameters()), lr=1e-2)
    target = torch.cat([torch.ones(16), -torch.ones(16)])  # the value depends only on t
    for _ in range(200):
        x, tt, tx = torch.cat([h, h]), torch.cat([t1, t2]), torch.cat([text, text])
        loss = ((critic(x, tt, tx) - target) ** 2).mean() + ((ablated(x, tt, tx) - target) ** 2).mean()
        opt.zero_grad(), loss.backward(), opt.step()
    with torch.no_grad():
        x, tt, tx = torch.cat([h, h]), torch.cat([t1, t2]), torch.cat([text, text])
        film_mse = ((critic(x, tt, tx) - target) ** 2).mean()
        blind_mse = ((ablated(x, tt, tx) - target) ** 2).mean()
    assert film_mse < 0.05 and blind_mse > 0.9  # without t the critic cannot tell the two apart


def test_classifier_reward_scores_every_retain_prompt_by_the_value_it_names(toy_models):
    ps = common.concept_prompts("circle", toy_models)
    judge = rl_critic.evaluation.Judge(toy_models)
    # forget prompts, a same-kind retain prompt and a cross-kind one ("a striped shape" names no shape)
    prompts = ps.forget[:2] + ["a red square", "a striped shape"]
    images = common.sample(toy_models, prompts, [0, 1, 2, 3]).images
    roll = dict(prompts=prompts, images=images, is_forget=torch.tensor([True, True, False, False]))
    r = rl_critic.evaluation.terminal_rewards("classifier", roll, ps, None, judge)
    assert rl_critic.evaluation._retain_target("a striped shape", ps) == ("texture", "striped")
    assert rl_critic.evaluation._retain_target("a red square", ps) == ("shape", "square")
    # the base model draws what it is asked: circles earn little as forget samples (1 - p(circle)),
    # the retain images earn much (p(own value))
    assert r[:2].max() < 0.2 and r[2:].min() > 0.8, r


def test_zero_shot_reward_is_one_minus_clips_probability_and_does_not_pay_for_a_blank_dotted_canvas(toy_models):
    ps = common.concept_prompts("dotted", toy_models)
    clip = rl_critic.evaluation.load_clip(toy_models)
    prompts = ps.forget[:8]
    dotted = common.sample(toy_models, prompts, list(range(8))).images
    others = common.sample(toy_models, common.cycle([p for p, _ in ps.retain_in], 8), list(range(8))).images
    blank = torch.full_like(dotted, 0.85)  # the light background alone

    def r(images, reward, forget=True):
        roll = dict(prompts=prompts, images=images, is_forget=torch.full((8,), forget),
                    text=clip.text_features(prompts))
        return rl_critic.evaluation.terminal_rewards(reward, roll, ps, clip, None)

    # the formula, recomputed here: p = softmax(logit_scale * cos(image, [concept, alternatives]))[0]
    img = torch.nn.functional.normalize(clip.image_features(others), dim=-1)
    texts = torch.nn.functional.normalize(clip.text_features([ps.forget[0]] + [p for p, _ in ps.retain_in]), dim=-1)
    p = (clip.model.logit_scale.exp().item() * img @ texts.T).softmax(-1)[:, 0]
    cos_concept = img @ texts[0]
    assert torch.allclose(r(others, "clip-zero-shot"), 1 - p, atol=1e-5)
    assert torch.allclose(r(others, "clip"), -cos_concept, atol=1e-5)
    assert torch.allclose(r(others, "clip-hybrid"), 1 - p - cos_concept, atol=1e-5)
    own = torch.nn.functional.normalize(clip.text_features(prompts), dim=-1)
    for reward in ("clip", "clip-zero-shot", "clip-hybrid"):  # retain prompts: cos(image, own prompt)
        assert torch.allclose(r(others, reward, forget=False), (img * own).sum(-1), atol=1e-5)
    # measured 2026-11-25: the cosine pays a blank canvas more than a dotted image (-0.43 vs -0.55),
    # which is the road the default policy takes on dotted; zero-shot pays another texture far more
    # than a blank (0.997 vs 0.33), the cosine much less so (-0.18 vs -0.43)
    assert r(blank, "clip").mean() > r(dotted, "clip").mean()
    assert r(others, "clip-zero-shot").mean() - r(blank, "clip-zero-shot").mean() > 0.5
    assert r(others, "clip").mean() - r(blank, "clip").mean() < 0.5


@pytest.mark.slow(14)
def test_two_iterations_on_a_tiny_sd_pipeline_save_a_unet_that_reloads(tiny_sd, tmp_path):
    out = tmp_path / "run"
    r = run_script("rl_critic.py", "--model", str(tiny_sd), "--concept", "church",
                        "--iterations", "2", "--samples-per-iteration", "4", "--sample-steps", "3",
                        "--minibatch", "4", "--warmup-epochs", "2", "--critic-epochs", "1",
                        "--clip-model", str(common.TOY_DIR / "clip"), "--lr", "1e-3", "--clip-range", "0.2",
                        "--n-eval-images", "0", "--output-dir", str(out), "--device", "cpu", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    changed = changed_parameters(out / "unet", tiny_sd / "unet")
    assert changed and all(".attn2." in n for n in changed)


def _cgru_toy_run(tmp_path, concept, *extra):
    out = tmp_path / f"rl_critic-{concept}"
    r = run_script("rl_critic.py", "--model", "toy", "--concept", concept, "--seed", "0", "--output-dir", str(out),
                   *extra, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    run = json.loads((out / "run.json").read_text())
    print(json.dumps(m, indent=1), run["critic_mse"], run["reward_var"])
    return m, run


@pytest.mark.slow(135)
def test_cgru_forgets_triangle_in_half_its_iterations_and_its_critic_explains_the_reward(tmp_path):
    # One concept, one seed, and half the default 60 iterations, to keep the suite short: the
    # defaults' own evidence is the benchmark's 30 records (3 seeds; test_benchmark checks they ran
    # today's defaults), where triangle meets the bar at seeds 0, 1 and 2. At 30 iterations,
    # measured 2026-12-02 (2 cores, 130 s a run): UA 100% at seeds 0, 1 and 2, in-domain retain
    # 96.9 / 100 / 96.9% (base 98.4 / 98.4 / 100%), critic MSE 2.5 / 7.0 / 3.1 vs reward variance
    # 17.0 / 28.8 / 12.3. At 20 iterations seed 2 forgot only 81%.
    m, run = _cgru_toy_run(tmp_path, "triangle", "--iterations", "30")
    assert run["critic_mse"] < run["reward_var"]
    assert evaluation.meets_bar("rl_critic", m), m["unlearned"]


def test_advantages_are_standardised_over_the_steps_that_train():
    adv = torch.arange(12.0).view(3, 4)
    adv[:, 2:] += 100                          # the last two steps of each trajectory never train
    trained = rl_critic.normalise_advantages(adv, 2)[:, :2]
    # standardised over the trained steps (statistics over all steps would give mean -0.96, std 0.07)
    assert abs(trained.mean().item()) < 1e-6 and abs(trained.std().item() - 1) < 1e-5


def _tiny_train(toy_models, monkeypatch, calls, reuse):
    """Three CGRU iterations on the toy with a tiny budget, the critic and the policy update spied on."""
    import dataclasses
    models = dataclasses.replace(toy_models, unet=common.frozen_copy(toy_models.unet))
    args = rl_critic.parse_args(["--model", "toy", "--concept", "circle", "--iterations", "3",
                                 "--samples-per-iteration", "4", "--sample-steps", "2", "--warmup-epochs", "1",
                                 "--critic-epochs", "1", "--reuse-iterations", str(reuse)])
    params = common.select_trainable(models.unet, args.train, verbose=False)
    clip = rl_critic.evaluation.load_clip(models)
    critic = rl_critic.Critic(clip.model.config.projection_dim, clip.model.config.projection_dim)
    for name in ("fit_critic", "critic_values", "policy_update"):
        original = getattr(rl_critic, name)

        def spy(*a, _name=name, _original=original, **kw):
            calls.append((_name, a))
            return _original(*a, **kw)
        monkeypatch.setattr(rl_critic, name, spy)
    rl_critic.train(args, models, common.concept_prompts("circle", models), common.frozen_copy(models.unet),
                    params, clip, critic)


def test_the_critic_values_each_rollout_before_it_is_refitted_on_it(toy_models, monkeypatch):
    calls = []
    _tiny_train(toy_models, monkeypatch, calls, reuse=0)
    order = [name for name, _ in calls]
    # warm-up fit on the reference's rollout, then per iteration: values, fit, update
    assert order == ["fit_critic"] + ["critic_values", "fit_critic", "policy_update"] * 3


def test_replayed_trajectories_keep_their_stored_behaviour_log_probs_up_to_the_age_cap(toy_models, monkeypatch):
    calls = []
    _tiny_train(toy_models, monkeypatch, calls, reuse=1)
    updates = [a for name, a in calls if name == "policy_update"]
    # policy_update(args, models, unet_ref, params, opt, replay, ...): the replayed iterations, oldest first
    rolls = [{k: (torch.cat([r[k] for r in u[5]]) if k != "prompts" else sum((r[k] for r in u[5]), []))
              for k in ("prompts", "log_probs", "adv")} for u in updates]
    advs = [r["adv"] for r in rolls]
    assert [len(r["prompts"]) for r in rolls] == [4, 8, 8]    # itself, then itself + one replayed iteration
    # iteration 2 replays iteration 1's trajectories with the log-probs and advantages stored at
    # sampling time (the policy has moved since: recomputing them would give other numbers)
    assert torch.equal(rolls[1]["log_probs"][:4], rolls[0]["log_probs"])
    assert torch.equal(advs[1][:4], advs[0])
    assert torch.equal(rolls[2]["log_probs"][:4], rolls[1]["log_probs"][4:])  # iteration 1 aged out


def test_accumulated_minibatches_make_one_adam_step_on_their_mean_gradient(toy_models):
    # DDPO's granularity (the SD default): several minibatches' gradients, averaged, per Adam step
    import dataclasses
    s = rl_critic.sample_trajectories(toy_models, ["a circle", "a red square"], [1, 2], 4, 1.0, eta=1.0)
    roll = dict(prompts=["a circle", "a red square"], is_forget=torch.tensor([True, False]), **s)
    adv = torch.linspace(-2, 2, 8).view(2, 4)
    grads = {}
    for k_acc, minibatch in ((4, 2), (1, 8)):  # 8 pairs: 4 accumulated minibatches of 2, or one of 8
        models = dataclasses.replace(toy_models, unet=common.frozen_copy(toy_models.unet).requires_grad_(False))
        params = common.select_trainable(models.unet, "xattn", verbose=False)
        args = rl_critic.parse_args(["--model", "toy", "--concept", "circle", "--train-steps", "1", "--kl-weight", "0",
                                     "--minibatch", str(minibatch), "--grad-accumulation", str(k_acc),
                                     "--clip-range", "0.2", "--guidance-scale", "1"])
        opt = torch.optim.SGD(params, lr=1.0)
        before = [p.detach().clone() for p in params]
        rl_critic.policy_update(args, models, None, params, opt, [dict(roll, adv=adv)],
                                torch.Generator().manual_seed(0))
        grads[k_acc] = torch.cat([(b - p.detach()).flatten() for p, b in zip(params, before)])
    # SGD with lr 1: one step of the mean gradient either way (gradient clipping at norm 1 included)
    assert grads[1].abs().max() > 0
    assert torch.allclose(grads[4], grads[1], atol=1e-6, rtol=1e-4)


def test_terminal_advantages_are_the_final_reward_normalised_per_prompt_at_every_step():
    seen = {}
    prompts = ["a circle", "a circle", "a red square", "a blue ring"]
    raw = torch.tensor([1.0, 3.0, 10.0, -4.0])
    # every prompt seen fewer than min_count times: the whole batch's mean and (population) std
    adv = rl_critic.terminal_advantages(raw, prompts, seen, T=5, buffer=4, min_count=3)
    assert adv.shape == (4, 5) and torch.equal(adv, adv[:, :1].expand(-1, 5))
    assert torch.allclose(adv[:, 0], ((raw - raw.mean()) / raw.std(unbiased=False)).clamp(-5, 5), atol=1e-5)
    # "a circle" has now been seen 4 times (buffer 4): its own rewards normalise it
    adv = rl_critic.terminal_advantages(torch.tensor([5.0, 7.0, 0.0, 0.0]), prompts, seen, T=2, buffer=4,
                                         min_count=3)
    own = torch.tensor([1.0, 3.0, 5.0, 7.0])  # its last 4 rewards
    assert torch.allclose(adv[0, 0], (5.0 - own.mean()) / own.std(unbiased=False), atol=1e-5)
    assert torch.allclose(adv[1, 0], (7.0 - own.mean()) / own.std(unbiased=False), atol=1e-5)
    # extreme rewards are clipped at 5, as DDPO clips them
    extreme = torch.tensor([0.0] * 99 + [1e3])
    assert rl_critic.terminal_advantages(extreme, ["p"] * 100, {}, T=1, min_count=100).max() == 5


@pytest.mark.slow(40)
def test_the_terminal_reward_ablation_runs_without_a_critic_and_saves_a_model(tmp_path):
    out = tmp_path / "terminal"
    r = run_script("rl_critic.py", "--model", "toy", "--concept", "circle", "--advantages", "terminal",
                   "--iterations", "2", "--samples-per-iteration", "8", "--n-eval-images", "0",
                   "--output-dir", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "critic_mse" not in r.stderr.splitlines()[-1]
    run = json.loads((out / "run.json").read_text())
    assert run["args"]["advantages"] == "terminal" and run["critic_mse"] is None
