"""How often does the reference policy explore away from the concept? (CGRU's learning signal)

A policy gradient learns only from what the policy samples. CGRU's forget reward is high for
images that do not show the concept, so the share of forget-prompt samples the judge does not
call the concept is the reference policy's exploration rate: the rarer, the less there is to learn
from. This samples the concept's forget prompts with the policy CGRU trains (stochastic DDIM,
eta 1) at several classifier-free guidance scales and prints that share for each.

    python benchmarks/probes/exploration_by_guidance.py --concepts circle striped
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import common  # noqa: E402
import eval as evaluation  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts", nargs="*", default=["circle", "striped"], help="toy concepts")
    p.add_argument("--guidance", nargs="*", type=float, default=[1.0, 2.0, 3.0, 5.0], help="guidance scales")
    p.add_argument("--n", type=int, default=128, help="samples per concept and scale")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM stochasticity (CGRU's policy: 1)")
    a = p.parse_args()
    models = common.load_models("toy", torch.device("cpu"))
    judge = evaluation.Judge(models)
    print(f"\nShare of forget-prompt samples the judge does NOT call the concept ({a.n} samples, "
          f"{a.steps} steps, eta {a.eta}, seeds 1000-{1000 + a.n - 1})\n")
    print("| concept | " + " | ".join(f"guidance {w:g}" for w in a.guidance) + " |")
    print("|---" * (len(a.guidance) + 1) + "|")
    for concept in a.concepts:
        ps = common.toy_prompt_set(concept, models.toy)
        prompts = common.cycle(ps.forget, a.n)
        shares = []
        for w in a.guidance:
            images = common.sample(models, prompts, list(range(1000, 1000 + a.n)), steps=a.steps,
                                   guidance_scale=w, eta=a.eta).images
            shares.append(sum(v != concept for v in judge(images, ps.kind)) / a.n)
        print(f"| {concept} | " + " | ".join(f"{s:.1%}" for s in shares) + " |")


if __name__ == "__main__":
    main()
