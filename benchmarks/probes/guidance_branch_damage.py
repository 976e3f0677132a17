"""Which branch of classifier-free guidance carries a run's forgetting, and which its damage?

Guidance samples with eps_hat = eps_u + w (eps_c - eps_u): the unconditional branch eps_u (the
empty prompt) is shared by every prompt. A method that trains cross-attention changes both
branches, the one it aimed at and the one it did not. This evaluates a saved run three ways, on
the same prompts and seeds as its report: as trained; with the base model's eps_u and the trained
eps_c; with the trained eps_u and the base model's eps_c. If swapping the base eps_u back in
restores retain accuracy, the run's damage came through the unconditional branch.

    python benchmarks/probes/guidance_branch_damage.py --run outputs/rl_critic-circle
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import common  # noqa: E402
import eval as evaluation  # noqa: E402


class Branches(torch.nn.Module):
    """A UNet whose batched guidance call ([uncond, cond] halves) takes eps_u from one UNet and
    eps_c from another."""

    def __init__(self, unet_u, unet_c):
        super().__init__()
        self.unet_u, self.unet_c, self.config = unet_u, unet_c, unet_c.config

    def forward(self, x, t, encoder_hidden_states):
        n = len(x) // 2
        half = lambda v, s: v[s] if torch.is_tensor(v) and v.ndim == 1 else v  # noqa: E731
        u = self.unet_u(x[:n], half(t, slice(0, n)), encoder_hidden_states=encoder_hidden_states[:n]).sample
        c = self.unet_c(x[n:], half(t, slice(n, None)), encoder_hidden_states=encoder_hidden_states[n:]).sample
        return SimpleNamespace(sample=torch.cat([u, c]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a saved toy run folder (outputs/<method>-<concept>)")
    p.add_argument("--n", type=int, default=64, help="images per group (the reports use 64)")
    a = p.parse_args()
    run = Path(a.run)
    metrics = json.loads((run / "metrics.json").read_text())
    models = common.load_models(json.loads((run / "run.json").read_text())["base_model"], torch.device("cpu"))
    trained = common.load_unet(run / "unet", "cpu")
    base = models.unet
    ps = common.toy_prompt_set(metrics["concept"], models.toy)
    es = evaluation.eval_set(ps, a.n, metrics["seed"])
    clip = evaluation.load_clip(models)
    judge = evaluation.Judge(models, clip)
    print(f"\n{run.name}: {a.n} images per group, seed {metrics['seed']}, guidance {models.guidance_scale}\n")
    print("| eps_u from | eps_c from | UA | synonym UA | retain in | retain cross |\n|---|---|---|---|---|---|")
    for name_u, name_c, unet in (("base", "base", base), ("trained", "trained", trained),
                                 ("base", "trained", Branches(base, trained)),
                                 ("trained", "base", Branches(trained, base))):
        m, _, _ = evaluation.evaluate(models, unet, es, judge, clip, ps.concept)
        print(f"| {name_u} | {name_c} | {m['ua']:.1%} | {m['ua_synonym']:.1%} | {m['retain_in']:.1%} | "
              f"{m['retain_cross']:.1%} |", flush=True)


if __name__ == "__main__":
    main()
