"""Is KID-CLIP 0 for a model that did not change? The base model against itself on other seeds.

The benchmark compares the base model's retain images with an unlearned model's on the same
prompts. Image i of both sets has the same prompt, and two images of one prompt are closer than
two random ones, so an estimator that counts the pairs (a_i, b_i) in its cross term reads below
0 for a model that changes each image little. This draws the base model's retain images of each
(concept, seed) twice, on two disjoint seed blocks, and prints KID-CLIP with the pairs counted
(the estimator the benchmark used before 2026-12-04) and left out (eval.kernel_distance today),
with the mean and its 95% interval over the units: the second must be 0 within noise.

    python benchmarks/probes/kid_bias.py                         # 10 concepts x seeds 0-2, 64 images
    python benchmarks/probes/kid_bias.py --concepts circle --seeds 0 --n-images 8
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import eval as evaluation  # noqa: E402
from toy import world  # noqa: E402


def kid_pairs_counted(a: torch.Tensor, b: torch.Tensor) -> float:
    """The earlier estimator: within terms without the diagonal, every cross pair counted."""
    a, b = a.double(), b.double()
    d, m, n = a.shape[1], len(a), len(b)
    k_aa, k_bb, k_ab = [(x @ y.T / d + 1) ** 3 for x, y in ((a, a), (b, b), (a, b))]
    return float((k_aa.sum() - k_aa.diagonal().sum()) / (m * (m - 1))
                 + (k_bb.sum() - k_bb.diagonal().sum()) / (n * (n - 1)) - 2 * k_ab.mean())


def retain_features(models, clip, ps, n, seed, block) -> torch.Tensor:
    """CLIP features of the base model's retain images (in-domain, then cross-domain) of a seed block."""
    es = evaluation.eval_set(ps, n, seed, block)
    groups = [g for g in ("retain_in", "retain_cross") if g in es.groups]
    prompts = [p for g in groups for p in es.groups[g]]
    seeds = [s for g in groups for s in es.seeds[g]]
    return clip.image_features(common.sample(models, prompts, seeds).images)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts", nargs="+", default=world.SHAPES + world.TEXTURES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--n-images", type=int, default=64, help="images per retain group (the benchmark's 64)")
    a = p.parse_args()
    models = common.load_models("toy", torch.device("cpu"))
    clip = evaluation.load_clip(models)
    rows, counted, left_out = [], [], []
    for seed in a.seeds:
        for concept in a.concepts:
            ps = common.concept_prompts(concept, models)
            x = retain_features(models, clip, ps, a.n_images, seed, "eval")
            y = retain_features(models, clip, ps, a.n_images, seed, "noise_floor")
            counted.append(kid_pairs_counted(y, x))
            left_out.append(evaluation.kernel_distance(y, x))
            rows.append([concept, str(seed), f"{counted[-1]:.3f}", f"{left_out[-1]:.3f}"])

    def summary(v):
        half = 1.96 * np.std(v, ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
        return f"{np.mean(v):.3f} +- {half:.3f}"
    rows.append(["mean (95%)", f"{len(counted)} units", summary(counted), summary(left_out)])
    print(evaluation.markdown_table(["concept", "seed", "KID-CLIP, pairs counted", "KID-CLIP, pairs left out"],
                                    rows))


if __name__ == "__main__":
    main()
