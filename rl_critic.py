"""CGRU: critic-guided reinforcement unlearning for text-to-image diffusion.

Source: Vysotskyi, Kohut, Shpir, Rumezhak, Karpiv, "Critic-Guided Reinforcement Unlearning in
Text-to-Image Diffusion", arXiv 2601.03213 (ICML 2026). Public here: abstracts, summaries and
reviews. Stated: denoising is a sequential decision process; a timestep-aware critic built on
CLIP and trained on noisy intermediate states predicts the expected terminal reward; its
per-step values give advantages for PPO-style updates of the reverse diffusion kernel; old
trajectories are reused off-policy. Everything more specific is reconstructed: the policy's
log-prob, advantage clipping and the clip range from DDPO (Black et al. 2023), GAE from standard
PPO, the per-step KL from DPOK (Fan et al. 2023); DDPO has neither a critic nor a KL term.
One iteration of the loop, section by section:

  Rollouts  state s_t = (c, t, x_t), action a_t = x_{t-1}; the policy is the stochastic DDIM step
            (eta > 0) with classifier-free guidance, pi(x_{t-1} | s_t) = N(mu_theta, sigma_t^2 I),
            half the trajectories from forget prompts, half from retain prompts.
  Reward    only at the end, r(x_0, c): forget prompts -CLIP similarity to the concept, retain
            prompts +CLIP similarity to their own prompt. The judge is kept for evaluation.
  Critic    V_phi(x_t, t, c): decode x_t with the frozen VAE -> CLIP image tower -> FiLM on t
            -> concat with the prompt's CLIP text embedding -> MLP; Monte-Carlo regression on
            the terminal rewards of a replay buffer, warmed up on the reference's rollouts.
  Loss      rewards standardised, GAE (gamma = 1) on the critic's values from before it saw
            this rollout, PPO's clipped objective on the noisiest steps, a KL to the frozen
            reference on the retain prompts' steps; --reuse-iterations replays old trajectories
            through PPO ratios against the log-probs stored when they were sampled.
  toy       reconstructed from our measurements: the policy explores at guidance 1 while training
            and the KL is on (see TOY_DEFAULTS), else the toy's reference policy almost never
            samples anything but the concept and there is nothing to learn from.
The policy trains cross-attention matrices by default (`--train lora`: adapters on them, DDPO's
way); the SD defaults are DDPO's, with a learning rate for full matrices, untested on Stable Diffusion. The
derivation, what is reconstructed, and the evidence behind the defaults: docs/methods/rl_critic.md.

    python rl_critic.py --model toy --concept circle      # CPU, offline, a few minutes
    python rl_critic.py --concept church                   # Stable Diffusion v1.4, GPU
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding  # sinusoidal, as in the UNet
from torch import nn

import common
import eval as evaluation

# --- Arguments ---


@dataclass
class Args(common.RunArgs):
    train: str = common.arg("xattn", "policy parameters (lora: new adapters, --lora-rank, --lora-on)",
                            choices=["xattn", "noxattn", "full", "lora"])
    lora_rank: int = common.arg(4, "--train lora: the adapters' rank r", ">=1")
    lora_on: str = common.arg("xattn", "--train lora: the attention layers wrapped (xattn: cross, noxattn: "
                              "self, full: both)", choices=list(common.LORA_LAYERS))
    iterations: int = common.arg(None, "policy iterations (sample -> fit critic -> PPO)", ">=1")
    samples_per_iteration: int = common.arg(None, "trajectories per iteration (half forget, half retain: at least 4)", ">=4")
    sample_steps: int = common.arg(None, "DDIM steps of a trajectory (the MDP's horizon)", ">=1")
    eta: float = common.arg(1.0, "DDIM stochasticity: the policy's noise scale (eta = 0 has no log-probability)", ">0")
    guidance_scale: float = common.arg(None, "classifier-free guidance while training (the report samples at the model's own)", ">=0")
    lr: float = common.arg(None, "policy Adam learning rate", ">0")
    ppo_epochs: int = common.arg(1, "passes over each iteration's (state, action) pairs", ">=1")
    reuse_iterations: int = common.arg(0, "off-policy reuse: also train on this many previous iterations' trajectories, "
                                          "through PPO ratios against their stored log-probs (0: on-policy)", ">=0")
    minibatch: int = common.arg(None, "(state, action) pairs per forward and backward pass", ">=1")
    grad_accumulation: int = common.arg(None, "minibatches whose mean gradient makes one Adam step", ">=1")
    clip_range: float = common.arg(None, "PPO ratio clip epsilon", ">0")
    gae_lambda: float = common.arg(0.95, "GAE lambda: 0 = per-step critic differences, 1 = r - V(s_t)", "[0,1]")
    advantages: str = common.arg("critic", "critic: GAE on the critic's values; terminal: the paper's ablation, no critic, "
                                           "every step gets the final reward normalised per prompt (DDPO)", choices=["critic", "terminal"])
    kl_weight: float = common.arg(None, "beta_kl: per-step KL to the frozen reference policy on the retain prompts' steps", ">=0")
    kl_uncond: bool = common.arg(False, "also hold the unconditional branch at the reference in the KL, on every step")
    train_steps: float = common.arg(None, "PPO trains on this share of each trajectory's steps, noisiest first (1: all)", "(0,1]")
    reward: str = common.arg("clip", "terminal reward: CLIP similarity; CLIP zero-shot 1 - p(concept); their sum; "
                                     "or the judge (then UA is optimised)",
                             choices=["clip", "clip-zero-shot", "clip-hybrid", "classifier"])
    critic_input: str = common.arg("x_t", "what the critic sees: the noisy state, or x0_hat (ablation)", choices=["x_t", "x0_hat"])
    timestep: bool = common.arg(True, "FiLM timestep conditioning of the critic (--no-timestep: ablation)")
    clip_model: str = common.arg(None, "CLIP of the reward and the critic (default: the toy's; SD: openai/clip-vit-base-patch32)")
    critic_lr: float = common.arg(1e-3, "critic Adam learning rate", ">0")
    critic_epochs: int = common.arg(20, "critic passes over the replay buffer per iteration", ">=0")
    warmup_epochs: int = common.arg(20, "critic passes over the reference policy's rollouts before any update", ">=0")
    buffer_iterations: int = common.arg(4, "replay buffer: keep the states of this many recent iterations", ">=1")
    grad_clip: float = common.arg(1.0, "clip the policy's gradient norm to this", ">0")


# Where the toy and Stable Diffusion defaults differ (evidence: docs/methods/rl_critic.md, "Defaults").
# SD, untested: DDPO's, but the rate PURE and MiM-MU use for full cross-attention matrices (DDPO's 3e-4
# is for LoRA), and DDPO's few Adam steps per iteration: 64 x 50 pairs / 8 a minibatch / 200 = 2.
SD_DEFAULTS = dict(iterations=100, samples_per_iteration=64, sample_steps=50, guidance_scale=5.0,
                   lr=1e-5, minibatch=8, grad_accumulation=200, clip_range=1e-4, train_steps=1.0,
                   kl_weight=0.0, clip_model="openai/clip-vit-base-patch32")
# reconstructed (toy): the policy explores at guidance 1 while training, the KL holds the retain
# prompts, PPO trains the noisiest half of each trajectory (docs/methods/rl_critic.md)
# (the toy takes one Adam step per minibatch of 64 pairs: 32 x 5 trained pairs make 3 per iteration)
TOY_DEFAULTS = dict(iterations=60, samples_per_iteration=32, sample_steps=10, guidance_scale=1.0,
                    lr=1e-3, minibatch=64, grad_accumulation=1, clip_range=1e-4, train_steps=0.5,
                    kl_weight=0.3)

# --train lora: LoRA's B starts at zero and few weights train, so a larger step than full weights:
# tenfold (toy: searched on seed 0, docs/lab/searches/rl_critic_lora.md; SD: untested)
LORA_LR = dict(toy=1e-2, sd=1e-4)

# Iteration k of a run with --seed s draws its prompts and image seeds from generator s * 100_000 + k.
ROLLOUT_SEED_STRIDE = 100_000


def parse_args(argv: list[str] | None = None) -> Args:
    """The command line, with the toy or the SD column filled in and every number checked."""
    return common.parse_run_args(Args, argv, TOY_DEFAULTS, SD_DEFAULTS, LORA_LR)


# --- Setup ---

def setup(args: Args):
    """Seed and device, the models, the prompt sets, the frozen reference policy, theta: the
    policy's UNet parameters chosen by --train (printed with their count), the frozen CLIP
    (reward and critic features) and the critic's head V_phi."""
    device, dtype = common.seed_and_device(args.seed, args.device, args.mixed_precision)
    models = common.load_models(args.model, device, dtype, args.sample_batch_size)
    ps = common.concept_prompts(args.concept, models, common.read_prompt_list(args.forget_prompts),
                                common.read_prompt_list(args.retain_prompts))
    if args.reward == "classifier":
        common.one_concept(ps, "CGRU with --reward classifier", "the judge's reward names one concept")
    unet_ref = common.reference(models.unet, args.train)  # the reference policy, frozen
    params = common.select_trainable(models.unet, args.train, lora_rank=args.lora_rank, lora_on=args.lora_on)  # theta
    if args.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
    clip = evaluation.load_clip(models, args.clip_model)       # frozen: reward and critic features
    feat_dim = clip.model.config.projection_dim
    critic = Critic(feat_dim, feat_dim, film=args.timestep).to(models.device)  # V_phi: trains
    return models, ps, unet_ref, params, clip, critic


# --- Data ---
# The method's data are its own rollouts: trajectories the current policy samples (one iteration's).

def sample_trajectories(models: common.Models, prompts: list[str], seeds: list[int], steps: int,
                        guidance_scale: float, eta: float) -> dict:
    """common.sample with eta > 0 (every step draws x_{t-1} ~ pi(. | s_t)), recording each step:
    x_t (n, T, 4, h, w) the states, x_prev (n, T, 4, h, w) the actions, x0_hat the predicted clean
    latent at each state, log_probs (n, T) log pi(x_{t-1} | s_t) under the policy that sampled it
    (the behaviour policy PPO's ratio divides by), timesteps (T,) and the final images."""
    record = {k: [] for k in ("x_t", "x_prev", "x0_hat", "log_probs")}

    def on_step(t, x_t, x_prev, output, log_prob):
        record["x_t"].append(x_t.cpu()), record["x_prev"].append(x_prev.cpu())
        record["log_probs"].append(log_prob.cpu())
        record["x0_hat"].append(common.predicted_x0(models.scheduler, output, t, x_t).cpu())

    images = common.sample(models, prompts, seeds, steps=steps, guidance_scale=guidance_scale, eta=eta,
                           on_step=on_step).images
    timesteps = models.scheduler.timesteps.clone()
    T = len(timesteps)  # steps arrive batch by batch: T of the first batch, then T of the next...
    out = {k: torch.cat([torch.stack(v[i:i + T], 1) for i in range(0, len(v), T)]) for k, v in record.items()}
    return {**out, "images": images, "timesteps": timesteps}


def rollouts(models: common.Models, ps: common.PromptSet, n: int, steps: int, guidance_scale: float,
             eta: float, seed: int) -> dict:
    """One iteration's n trajectories under the current policy: half forget, half retain prompts."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda items, k: [items[i] for i in torch.randint(0, len(items), (k,), generator=g)]  # noqa: E731
    prompts = pick(ps.forget, n // 2) + pick(ps.retain, n - n // 2)
    is_forget = torch.tensor([True] * (n // 2) + [False] * (n - n // 2))
    seeds = torch.randint(0, 2 ** 31 - 1, (n,), generator=g).tolist()
    models.unet.eval()
    return dict(prompts=prompts, is_forget=is_forget,
                **sample_trajectories(models, prompts, seeds, steps, guidance_scale, eta))


# --- Reward ---
# r(x_0, c), only at the end of a trajectory: on forget prompts -CLIP similarity to the concept, on
# retain prompts +CLIP similarity to their own prompt (--reward: CLIP zero-shot, their sum, or the
# judge). Scoring images is measurement, so it lives beside the judges: eval.terminal_rewards.


# --- Critic ---

class Critic(nn.Module):
    """V_phi(x_t, t, c) on frozen CLIP features: FiLM on t, then an MLP on [h', text]."""

    def __init__(self, feat_dim: int, text_dim: int, hidden: int = 256, film: bool = True):
        super().__init__()
        self.film = film
        self.t_mlp = nn.Sequential(nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, 2 * feat_dim))
        nn.init.zeros_(self.t_mlp[-1].weight), nn.init.zeros_(self.t_mlp[-1].bias)  # start as identity
        self.head = nn.Sequential(nn.Linear(feat_dim + text_dim, hidden), nn.SiLU(),
                                  nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, h: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = F.normalize(h, dim=-1)
        if self.film:
            g, b = self.t_mlp(get_timestep_embedding(t, 64, downscale_freq_shift=0)).chunk(2, dim=-1)
            # h' = (1 + g(t)) * h + b(t)
            h = (1 + g) * h + b
        return self.head(torch.cat([h, F.normalize(text, dim=-1)], dim=-1)).squeeze(-1)


@torch.no_grad()
def state_features(models: common.Models, clip, states: torch.Tensor) -> torch.Tensor:
    """CLIP image features of the decoded states the critic judges, (n, T, ...) -> (n, T, feat)."""
    n, T = states.shape[:2]
    flat = states.flatten(0, 1)
    feats = []
    for i in range(0, len(flat), 256):
        images = common.decode_latents(models, flat[i:i + 256].to(models.device))
        feats.append(clip.image_features(images))
    return torch.cat(feats).view(n, T, -1)


def critic_rows(h: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor, r: torch.Tensor | None = None):
    """A rollout's (n, T) states as one row per state, in sampling order: the features h, the
    timestep t, the prompt's text embedding (and the trajectory's terminal reward, the target)."""
    n, T = h.shape[:2]
    rows = (h.flatten(0, 1), timesteps.repeat(n), text.repeat_interleave(T, 0))
    return rows if r is None else (*rows, r.repeat_interleave(T))


def fit_critic(critic, opt, buffer: list, epochs: int, generator: torch.Generator, device) -> float:
    """Monte-Carlo regression of V_phi on the terminal rewards, over every stored state (`buffer`:
    critic_rows of recent rollouts). Returns the validation MSE: on the newest rollout, measured
    BEFORE fitting on it."""
    with torch.no_grad():
        h, t, text, target = (x.to(device) for x in buffer[-1])
        val_mse = F.mse_loss(critic(h, t, text), target).item()
    h, t, text, target = (torch.cat(column).to(device) for column in zip(*buffer))
    for _ in range(epochs):
        for idx in torch.randperm(len(h), generator=generator).split(256):
            loss = F.mse_loss(critic(h[idx], t[idx], text[idx]), target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return val_mse


@torch.no_grad()
def critic_values(critic, h: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor, device) -> torch.Tensor:
    """V_phi(s_t) of every state of a rollout: (n, T), in sampling order (noisiest first)."""
    return critic(*(x.to(device) for x in critic_rows(h, timesteps, text))).view(h.shape[:2]).cpu()


# --- Loss ---
# Everything the policy is optimised for, in the order it is computed: the reward shaped, the
# advantages, the steps that train, and the PPO + KL objective.

def reward_statistics(raw: torch.Tensor, is_forget: torch.Tensor) -> dict:
    """The shaping's constants, taken once from the reference policy's rewards: each group's mean
    and the pooled within-group std. reconstructed: a per-group std would blow up a group the
    reference scores alike (the judge gives every reference circle 1 - p(circle) ~ 0)."""
    f = is_forget
    return {"forget": raw[f].mean(), "retain": raw[~f].mean(),
            "scale": (0.5 * (raw[f].var() + raw[~f].var())).sqrt() + 1e-6}


def shape_rewards(raw: torch.Tensor, is_forget: torch.Tensor, stats: dict) -> torch.Tensor:
    # r = (raw - mean of its group) / pooled std, with the reference policy's (fixed) statistics
    return (raw - torch.where(is_forget, stats["forget"], stats["retain"])) / stats["scale"]


def gae(values: torch.Tensor, reward: torch.Tensor, lam: float) -> torch.Tensor:
    """Advantages of every step; values (n, T) are V(s_t) in sampling order (noisiest first).

    TD residual with gamma = 1: delta_t = V(s_{t-1}) - V(s_t), with V(s_0) := r(x_0, c);
    GAE: A_t = delta_t + lambda * A_{t-1}, recursing from the last denoising step backwards.
    lambda = 0 gives V(next) - V(s_t); lambda = 1 gives r - V(s_t).
    """
    next_values = torch.cat([values[:, 1:], reward[:, None]], dim=1)
    deltas = next_values - values
    adv = torch.zeros_like(values)
    running = torch.zeros_like(reward)
    for k in reversed(range(values.shape[1])):
        running = deltas[:, k] + lam * running
        adv[:, k] = running
    return adv


def trained_steps(T: int, share: float) -> int:
    """How many steps of a T-step trajectory PPO trains on (--train-steps): the noisiest ones.
    reconstructed: only the noisiest steps, where the sample's content is decided."""
    return max(1, round(T * share))


def normalise_advantages(adv: torch.Tensor, n_train: int) -> torch.Tensor:
    """Standardise with the mean and std of the steps PPO trains on (the noisiest n_train of each
    trajectory; the others never reach the loss), then clip to +-5. reconstructed: one mean and
    std over forget and retain trajectories together (the rewards are already standardised per
    group by shape_rewards); DDPO normalises per prompt, as the terminal-reward ablation does."""
    trained = adv[:, :n_train]
    return ((adv - trained.mean()) / (trained.std() + 1e-8)).clamp(-5, 5)


def terminal_advantages(raw: torch.Tensor, prompts: list[str], seen: dict, T: int, buffer: int = 16,
                        min_count: int = 16) -> torch.Tensor:
    """The ablation without a critic: A_t = the trajectory's final reward normalised per prompt, the
    same at every step, clipped to +-5 (DDPO, with its defaults 16 and 16). `seen` keeps each
    prompt's last `buffer` rewards, which give its mean and std; a prompt seen fewer than
    `min_count` times is normalised with the mean and std of the whole batch instead."""
    r = torch.empty_like(raw)
    for p in dict.fromkeys(prompts):
        idx = torch.tensor([i for i, q in enumerate(prompts) if q == p])
        seen[p] = (seen.get(p, []) + raw[idx].tolist())[-buffer:]
        ref = torch.tensor(seen[p]) if len(seen[p]) >= min_count else raw
        r[idx] = (raw[idx] - ref.mean()) / (ref.std(unbiased=False) + 1e-6)
    return r[:, None].expand(-1, T).clamp(-5, 5)


def ppo_loss(log_prob: torch.Tensor, log_prob_old: torch.Tensor, adv: torch.Tensor, clip_range: float):
    # ratio = exp(logp_theta - logp_behaviour);  L = -mean(min(ratio A, clip(ratio, 1 - eps, 1 + eps) A))
    ratio = torch.exp(log_prob - log_prob_old)
    clipped = torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return -torch.min(ratio * adv, clipped * adv).mean(), ratio


def loss(unet, unet_ref, models: common.Models, mb: dict, guidance_scale: float, eta: float, clip_range: float,
         kl_weight: float, kl_uncond: bool):
    """The whole policy objective on a minibatch of stored (state, action) pairs, as (total, terms):

        L = L_PPO + beta_kl * (KL_retain [+ KL_uncond])
        ratio  = exp(log pi_theta(a_t | s_t) - log pi_behaviour(a_t | s_t))
        L_PPO  = -mean min(ratio A_t, clip(ratio, 1 - eps, 1 + eps) A_t)
        KL(pi_theta || pi_ref) per step = ||mu_theta - mu_ref||^2 / (2 sigma_t^2)   (equal variances)
        KL_retain: that KL averaged over the retain prompts' pairs only
        KL_uncond: the same KL for the unconditional branch eps_u, on every pair (--kl-uncond)

    `mb` holds x_t, x_prev (the stored action), t, t_prev, cond, uncond, log_prob_old (the behaviour
    policy's), adv and is_forget. The KL terms are off when beta_kl = 0.
    """
    x_t, x_prev, t = mb["x_t"], mb["x_prev"], mb["t"]
    hold, both = kl_weight > 0, kl_weight > 0 and kl_uncond  # which KL terms are on
    with common.autocast(models.device, models.dtype):
        eps = common.guided_eps(unet, x_t, t, mb["cond"], mb["uncond"], guidance_scale, with_uncond=both)
    eps, eps_u = (eps[0].float(), eps[1].float()) if both else (eps.float(), None)
    _, log_prob, mean, sigma = common.ddim_step(models.scheduler, eps, t, mb["t_prev"], x_t, eta, prev_sample=x_prev)
    total, ratio = ppo_loss(log_prob, mb["log_prob_old"], mb["adv"], clip_range)
    terms = {"ppo": total, "clipped": ((ratio - 1).abs() > clip_range).float().mean()}
    if not hold:
        return total, terms
    with torch.no_grad(), common.autocast(models.device, models.dtype):
        ref = common.guided_eps(unet_ref, x_t, t, mb["cond"], mb["uncond"], guidance_scale, with_uncond=both)
    eps_ref, eps_u_ref = ref if both else (ref, None)
    mu = lambda e: common.ddim_step(models.scheduler, e.float(), t, mb["t_prev"], x_t, eta, prev_sample=x_prev)[2]  # noqa: E731
    # KL(pi_theta || pi_ref) per step, equal variances: ||mu_theta - mu_ref||^2 / (2 sigma_t^2);
    # DPOK's regulariser (DDPO's loss has no KL)
    kl = ((mean - mu(eps_ref)) ** 2 / (2 * sigma ** 2)).mean(dim=tuple(range(1, mean.ndim)))
    # reconstructed: held on the retain prompts' steps only; on a forget prompt the KL would pull
    # the policy back toward the concept it is meant to leave
    retain = (~mb["is_forget"]).to(kl.device, kl.dtype)
    kl = (kl * retain).sum() / retain.sum().clamp(min=1)
    # reconstructed (--kl-uncond): guidance uses eps_u for every prompt, but at training guidance 1
    # it is not in the policy and nothing else holds it
    kl_u = ((mu(eps_u) - mu(eps_u_ref)) ** 2 / (2 * sigma ** 2)).mean() if both else 0.0
    # L = L_PPO + beta_kl * (KL_retain + KL_uncond)
    total = total + kl_weight * (kl + kl_u)
    terms.update(kl=kl, **({"kl_uncond": kl_u} if both else {}))
    return total, terms


# --- Training ---

def policy_update(args: Args, models: common.Models, unet_ref, params, opt, replay: list[dict],
                  generator: torch.Generator, scaler=None) -> dict:
    """PPO epochs over the (state, action) pairs of `replay` (this iteration's trajectories and any
    replayed ones, each with the behaviour log-probs and advantages stored when it was sampled) on
    the noisiest steps, re-scoring the stored actions under theta against the stored log-probs.
    `scaler`: the run's fp16 loss scaler, kept across iterations."""
    unet = models.unet.train()
    scaler = scaler or common.loss_scaler(args.mixed_precision, models.device)
    roll = {k: torch.cat([r[k] for r in replay]) for k in ("x_t", "x_prev", "log_probs", "is_forget", "adv")}
    roll["prompts"] = [p for r in replay for p in r["prompts"]]
    roll["timesteps"], adv = replay[-1]["timesteps"], roll["adv"]  # the same DDIM steps in every iteration
    n, T = adv.shape
    pairs = torch.cartesian_prod(torch.arange(n), torch.arange(trained_steps(T, args.train_steps)))
    cond = common.encode_prompts(models, roll["prompts"])
    uncond = common.encode_prompts(models, [""] * n)
    t_prev = common.previous_timesteps(roll["timesteps"])
    stats, n_updates, k_acc = {}, 0, args.grad_accumulation
    for _ in range(args.ppo_epochs):
        minibatches = pairs[torch.randperm(len(pairs), generator=generator)].split(args.minibatch)
        for j, mb in enumerate(minibatches):
            # Adam steps every k_acc minibatches, on their mean gradient (the last group may be short)
            first, group = j % k_acc == 0, min(k_acc, len(minibatches) - j // k_acc * k_acc)
            i, k = mb[:, 0], mb[:, 1]
            batch = dict(x_t=roll["x_t"][i, k].to(models.device), x_prev=roll["x_prev"][i, k].to(models.device),
                         t=roll["timesteps"][k].to(models.device), t_prev=t_prev[k], cond=cond[i], uncond=uncond[i],
                         log_prob_old=roll["log_probs"][i, k].to(models.device), adv=adv[i, k].to(models.device),
                         is_forget=roll["is_forget"][i])
            total, terms = loss(unet, unet_ref, models, batch, args.guidance_scale, args.eta, args.clip_range,
                                args.kl_weight, args.kl_uncond)
            common.check_finite(n_updates, loss=total)
            if first:
                opt.zero_grad(set_to_none=True)
            scaler.scale(total / group).backward()
            stats.update({name: v.item() for name, v in terms.items()})
            if (j + 1) % k_acc and j + 1 < len(minibatches):
                continue  # gradients still accumulating
            n_updates += 1
            common.clipped_step(opt, scaler, params, args.grad_clip)
    return stats


def train(args: Args, models: common.Models, ps: common.PromptSet, unet_ref, params, clip, critic) -> dict:
    """Iteration 0 warms the critic up on the reference policy's rollouts; each later iteration
    samples, computes advantages with the critic as it was, refits the critic, updates the policy.
    With --advantages terminal there is no critic: iteration 0 only fills the per-prompt reward
    statistics, and every step's advantage is its trajectory's normalised final reward."""
    opt = torch.optim.Adam(params, lr=args.lr)
    scaler = common.loss_scaler(args.mixed_precision, models.device)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr)
    judge = evaluation.Judge(models, clip) if args.reward == "classifier" else None
    g = torch.Generator().manual_seed(args.seed)
    buffer, replay, seen = [], [], {}  # seen: each prompt's recent rewards (--advantages terminal)
    terminal = args.advantages == "terminal"
    critic_mse = None
    bar = common.progress(args.iterations + 1, "CGRU")
    for it in bar:
        roll = rollouts(models, ps, args.samples_per_iteration, args.sample_steps, args.guidance_scale, args.eta,
                        seed=args.seed * ROLLOUT_SEED_STRIDE + it)
        roll["text"] = clip.text_features(roll["prompts"])  # the prompts' CLIP embeddings: reward and critic
        raw = evaluation.terminal_rewards(args.reward, roll, ps, clip, judge)
        f = roll["is_forget"]
        if it == 0:  # the reference policy's statistics shape every later reward
            reward_stats = reward_statistics(raw, f)
        r = shape_rewards(raw, f, reward_stats)
        reward_var = r.var().item()
        if terminal:  # the ablation: no critic; A_t = the final reward, normalised per prompt (DDPO)
            adv = terminal_advantages(raw, roll["prompts"], seen, args.sample_steps)
        else:
            h = state_features(models, clip, roll[args.critic_input])
            # V(s_t) from the critic before it is refitted on this rollout: a baseline that has seen
            # the returns it is subtracted from shrinks the advantages toward 0 (it 0 has no update)
            values = critic_values(critic, h, roll["timesteps"], roll["text"], models.device) if it > 0 else None
            buffer = (buffer + [critic_rows(h, roll["timesteps"], roll["text"], r)])[-args.buffer_iterations:]
            # validation MSE of the critic (on this rollout, before fitting) vs the reward's variance
            critic_mse = fit_critic(critic, critic_opt, buffer,
                                    args.warmup_epochs if it == 0 else args.critic_epochs, g, models.device)
        if it == 0:  # warm-up: the critic (or the per-prompt statistics) has seen the reference policy
            continue
        if not terminal:
            n_train = trained_steps(args.sample_steps, args.train_steps)
            adv = normalise_advantages(gae(values, r, args.gae_lambda), n_train)
        # off-policy reuse: keep this rollout (its behaviour log-probs are already stored) with its
        # advantages; replayed ones keep the advantages computed when they were sampled
        keep = ("prompts", "is_forget", "x_t", "x_prev", "log_probs", "timesteps")
        replay = (replay + [{**{k: roll[k] for k in keep}, "adv": adv}])[-(args.reuse_iterations + 1):]
        stats = policy_update(args, models, unet_ref, params, opt, replay, g, scaler)
        log = {"r_forget": raw[f].mean().item(), "r_retain": raw[~f].mean().item(),
               **({} if terminal else {"critic_mse": critic_mse}), "reward_var": reward_var, **stats}
        common.show(bar, log)
    return {"critic_mse": critic_mse, "reward_var": reward_var,
            "r_forget_start": reward_stats["forget"].item(), "r_forget_end": raw[f].mean().item()}


# --- Save and report ---

def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.time()
    out = args.output_dir or common.default_output_dir("rl_critic", args.concept)
    with common.output_folder(out, args.overwrite) as folder:
        models, ps, unet_ref, params, clip, critic = setup(args)
        log = train(args, models, ps, unet_ref, params, clip, critic)
        metrics = evaluation.save_and_report(folder, models, ps, models.unet, unet_ref, args, started,
                                             args.n_eval_images, args.seed, method="CGRU", **log)
    print(f"saved to {out}")
    return metrics


if __name__ == "__main__":
    common.cli(main)
