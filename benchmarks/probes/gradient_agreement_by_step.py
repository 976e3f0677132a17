"""Which denoising steps carry CGRU's policy-gradient signal, and which carry only noise?

Samples several independent batches of reference-policy trajectories for the forget prompts (the
same policy each time), and computes the REINFORCE gradient of each batch,
    g = mean_i sum_{k in K} A_i grad_theta log pi(x_{k-1} | x_k, c_i),
with A_i the trajectory's standardised reward, for several sets K of steps. If K carries a
signal, the gradients of independent batches point the same way (cosine > 0); if it carries
only noise, they are orthogonal (cosine ~ 0). The norm says how much of the update K would take.

    python benchmarks/probes/gradient_agreement_by_step.py --concept circle
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import common  # noqa: E402
import rl_critic  # noqa: E402


def batch_gradients(args, models, ps, clip, params, seed: int, step_sets: dict) -> dict:
    roll = rl_critic.rollouts(models, ps, args.samples_per_iteration, args.sample_steps, args.guidance_scale,
                              args.eta, seed=seed)
    roll["text"] = clip.text_features(roll["prompts"])
    f = roll["is_forget"]
    raw = rl_critic.evaluation.terminal_rewards(args.reward, roll, ps, clip, None)[f]
    adv = (raw - raw.mean()) / raw.std()
    idx = torch.nonzero(f).flatten()
    cond = common.encode_prompts(models, [roll["prompts"][i] for i in idx])
    uncond = common.encode_prompts(models, [""] * len(idx))
    models.unet.train()  # as in rl_critic.policy_update (rollouts() leaves it in eval mode)
    adv = adv.to(models.device)
    grads = {}
    for name, steps in step_sets.items():
        for p in params:
            p.grad = None
        for k in steps:
            x_t, x_prev = roll["x_t"][idx, k].to(models.device), roll["x_prev"][idx, k].to(models.device)
            t = roll["timesteps"][k].repeat(len(idx)).to(models.device)
            eps = common.guided_eps(models.unet, x_t, t, cond, uncond, args.guidance_scale).float()
            t_prev = common.previous_timesteps(roll["timesteps"])[k]
            _, log_prob, _, _ = common.ddim_step(models.scheduler, eps, t, t_prev, x_t, args.eta, prev_sample=x_prev)
            (-(adv * log_prob).mean()).backward()
        grads[name] = torch.cat([p.grad.flatten() for p in params]).clone()
    return grads


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concept", default="circle", help="toy concept")
    p.add_argument("--trajectories", type=int, default=64, help="forget trajectories per batch")
    p.add_argument("--batches", type=int, default=3, help="independent batches (cosines of every pair)")
    a = p.parse_args()
    args = rl_critic.parse_args(["--model", "toy", "--concept", a.concept,
                                 "--samples-per-iteration", str(2 * a.trajectories)])
    models, ps, _, params, clip, _ = rl_critic.setup(args)
    T = args.sample_steps
    step_sets = {"all steps": range(T), "noisiest half": range(T // 2), "least noisy half": range(T // 2, T),
                 "last step only": [T - 1]}
    grads = [batch_gradients(args, models, ps, clip, params, 20_000 + b, step_sets) for b in range(a.batches)]
    pairs = [(i, j) for i in range(a.batches) for j in range(i + 1, a.batches)]
    print(f"\nCGRU policy gradient on the forget prompts, toy '{a.concept}': {a.batches} independent batches "
          f"of {a.trajectories} base trajectories ({T} steps)\n")
    print("| steps trained | cosine between batches | gradient norm |\n|---|---|---|")
    for name in step_sets:
        cos = [F.cosine_similarity(grads[i][name], grads[j][name], dim=0).item() for i, j in pairs]
        norms = [g[name].norm().item() for g in grads]
        print(f"| {name} | {', '.join(f'{c:.2f}' for c in cos)} | "
              f"{', '.join(f'{n:.2f}' for n in norms)} |")


if __name__ == "__main__":
    common.cli(main)
