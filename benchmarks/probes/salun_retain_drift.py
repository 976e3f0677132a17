"""Does SalUn's retain term alone move the toy's neighbours? Trains baselines/salun.py's loop with
only one of its two terms (the other dropped), then asks the judge what the model draws for a few
plain prompts (32 images each, seeds 0-31).

    python benchmarks/probes/salun_retain_drift.py --term retain              # L_retain only
    python benchmarks/probes/salun_retain_drift.py --term retain --n-retain 256
    python benchmarks/probes/salun_retain_drift.py --term forget              # L_forget only

Measured 2026-12-01 (circle's mask, lr 1e-4, 200 steps): with L_retain alone, "a cross" gives 30
rings out of 32 (the base: 31 crosses); docs/lab/searches/salun.md.
"""

import argparse
import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "baselines")]
import common  # noqa: E402
import eval as evaluation  # noqa: E402
import salun  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--term", choices=["retain", "forget", "both"], default="retain", help="which term trains")
    p.add_argument("--concept", default="circle", help="the concept whose mask and forget set are used")
    p.add_argument("--prompts", nargs="*", default=["a cross", "a circle", "a diamond"], help="prompts to judge")
    p.add_argument("--lr", default="1e-4", help="Adam learning rate")
    p.add_argument("--n-retain", default="64", help="retain images")
    p.add_argument("--n-forget", default="64", help="forget images (the saliency mask's)")
    p.add_argument("--steps", default="200", help="training steps")
    p.add_argument("--n-images", type=int, default=32, help="images judged per prompt (seeds 0 to n - 1)")
    a = p.parse_args()
    args = salun.parse_args(["--model", "toy", "--concept", a.concept, "--device", "cpu", "--lr", a.lr,
                             "--n-retain", a.n_retain, "--n-forget", a.n_forget, "--steps", a.steps])
    models, ps, _, params = salun.setup(args)
    data = salun.make_data(args, models, ps)
    masks = salun.saliency_mask(args, models, params, data)
    full_loss = salun.loss

    def one_term(unet, models, forget_batch, pseudo_c, retain_batch, alpha):
        total, terms = full_loss(unet, models, forget_batch, pseudo_c, retain_batch, alpha)
        return {"both": total, "retain": terms["L_retain"], "forget": terms["L_forget"]}[a.term], terms

    salun.loss = one_term
    judge = evaluation.Judge(models)
    before = {q: common.sample(models, [q] * a.n_images, list(range(a.n_images))).images for q in a.prompts}
    salun.train(args, models, ps, params, masks, data)
    for q in a.prompts:
        after = common.sample(models, [q] * a.n_images, list(range(a.n_images))).images
        print(f"{q!r}: base {collections.Counter(judge(before[q], 'shape')).most_common(3)}, "
              f"after training {a.term} only {collections.Counter(judge(after, 'shape')).most_common(3)}")


if __name__ == "__main__":
    main()
