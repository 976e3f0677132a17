"""How well CGRU's critic predicts the terminal reward, with and without its two design choices.

Samples reference-policy trajectories on the toy (the rollouts CGRU's critic warms up on), fits the
critic V_phi(s_t) on some of them and measures its MSE on held-out trajectories, for:
  x_t + FiLM       the paper's critic: the noisy state, timestep-conditioned (the default)
  x_t, no FiLM     --no-timestep
  x0_hat + FiLM    --critic-input x0_hat (the predicted clean image)
The MSE is reported over all steps and per third of the trajectory (noisiest first), next to
the variance of the held-out rewards: a critic that explains nothing scores about that variance.

    python benchmarks/probes/critic_input_ablation.py --concept circle
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import common  # noqa: E402
import rl_critic  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concept", default="circle", help="toy concept")
    p.add_argument("--train-rollouts", type=int, default=4, help="rollouts of 32 trajectories to fit on")
    p.add_argument("--epochs", type=int, default=None, help="critic passes over the training states "
                                                            "(default: rl_critic.py's warm-up epochs)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    args = rl_critic.parse_args(["--model", "toy", "--concept", a.concept, "--seed", str(a.seed)])
    a.epochs = a.epochs or args.warmup_epochs
    models, ps, _, _, clip, _ = rl_critic.setup(args)
    rolls = []
    for i in range(a.train_rollouts + 1):  # the last one is held out
        roll = rl_critic.rollouts(models, ps, args.samples_per_iteration, args.sample_steps, args.guidance_scale,
                                  args.eta, seed=10_000 + i)
        roll["text"] = clip.text_features(roll["prompts"])
        roll["raw"] = rl_critic.evaluation.terminal_rewards(args.reward, roll, ps, clip, None)
        for source in ("x_t", "x0_hat"):
            roll["h_" + source] = rl_critic.state_features(models, clip, roll[source])
        rolls.append(roll)
        print(f"rollout {i + 1}/{a.train_rollouts + 1}", flush=True)
    # standardise like training: each group centred on its mean, pooled within-group std (train rollouts)
    raw = torch.cat([r["raw"] for r in rolls[:-1]])
    f = torch.cat([r["is_forget"] for r in rolls[:-1]])
    mean_f, mean_r = raw[f].mean(), raw[~f].mean()
    scale = (0.5 * (raw[f].var() + raw[~f].var())).sqrt()
    for r in rolls:
        r["r"] = (r["raw"] - torch.where(r["is_forget"], mean_f, mean_r)) / scale
    val_var = rolls[-1]["r"].var().item()
    T = rolls[0]["h_x_t"].shape[1]
    thirds = [range(0, T // 3), range(T // 3, 2 * T // 3), range(2 * T // 3, T)]
    rows = []
    for name, source, film in (("x_t + FiLM (default)", "x_t", True), ("x_t, no FiLM (--no-timestep)", "x_t", False),
                               ("x0_hat + FiLM (--critic-input x0_hat)", "x0_hat", True)):
        torch.manual_seed(a.seed)
        dim = clip.model.config.projection_dim
        critic = rl_critic.Critic(dim, dim, film=film)
        opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr)
        buf = [rl_critic.critic_rows(r["h_" + source], r["timesteps"], r["text"], r["r"]) for r in rolls]
        rl_critic.fit_critic(critic, opt, buf[:-1], a.epochs, torch.Generator().manual_seed(a.seed), "cpu")
        with torch.no_grad():
            h, t, text, target = buf[-1]
            err = ((critic(h, t, text) - target) ** 2).view(-1, T)
        rows.append((name, err.mean().item(), *[err[:, list(k)].mean().item() for k in thirds]))
    n_train = a.train_rollouts * args.samples_per_iteration
    print(f"\nCritic validation MSE, toy '{a.concept}', {n_train} training and {args.samples_per_iteration} "
          f"held-out base trajectories of {T} steps; held-out reward variance {val_var:.3f}\n")
    print("| critic | all steps | noisiest third | middle third | last third |\n|---|---|---|---|---|")
    for name, *v in rows:
        print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in v) + " |")


if __name__ == "__main__":
    common.cli(main)
