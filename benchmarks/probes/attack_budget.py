"""How much budget does the embedding attack need to bring a concept back from the BASE model?
Learns attack.py's placeholder embedding against the base toy UNet, concept by concept, and
judges "a <v*>" (64 images, attack.py's evaluation seeds) every --every steps.

    python benchmarks/probes/attack_budget.py                       # attack.py's budget, 10 concepts
    python benchmarks/probes/attack_budget.py --lr 3e-3 --steps 300 --concepts circle dotted

Measured 2026-12-01 (lr 1e-2, batch 16, 64 images, init "shape", seed 0): at least 91% of the
images show the concept after 50, 100 and 150 steps on every shape and texture (docs/methods/attack.md).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import attack  # noqa: E402
import common  # noqa: E402
import eval as evaluation  # noqa: E402
from toy import world  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts", nargs="*", default=world.SHAPES + world.TEXTURES, help="toy concepts")
    p.add_argument("--lr", type=float, default=attack.TOY_DEFAULTS["lr"], help="Adam learning rate of v")
    p.add_argument("--batch-size", type=int, default=attack.TOY_DEFAULTS["batch_size"], help="images per step")
    p.add_argument("--steps", type=int, default=attack.TOY_DEFAULTS["steps"], help="steps in all")
    p.add_argument("--every", type=int, default=50, help="judge every this many steps")
    p.add_argument("--n-images", type=int, default=attack.TOY_DEFAULTS["n_images"],
                   help="images the attack learns from, and images judged")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the steps and the images")
    a = p.parse_args()
    args = attack.Args(run="", **{**attack.TOY_DEFAULTS, "lr": a.lr, "batch_size": a.batch_size, "seed": a.seed,
                                  "n_images": a.n_images, "n_eval_images": a.n_images})
    models = common.load_models("toy", torch.device("cpu"))
    models.unet.eval().requires_grad_(False)
    judge = evaluation.Judge(models)
    seeds = attack.eval_seeds(a.seed, args.n_eval_images)
    for concept in a.concepts:
        t0 = time.time()
        ps = common.concept_prompts(concept, models)
        prompt = attack.template(models, ps)
        x0 = attack.make_data(args, models, ps)
        asr = {}
        for steps in range(a.every, a.steps + 1, a.every):
            # attack.learn_embedding is seeded: its first k steps are those of a longer run
            args.steps = steps
            placeholder, _ = attack.learn_embedding(args, models, models.unet, x0, prompt, f"{concept} {steps}")
            with torch.no_grad():
                states = placeholder.text_states([prompt] * len(seeds))
            placeholder.remove()
            asr[steps] = attack.success_rate(models, models.unet, judge, ps, [prompt] * len(seeds), seeds, states)[0]
        print(json.dumps({"concept": concept, "asr_base_by_step": asr, "nearest_words": placeholder.nearest_words(3),
                          "seconds": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main()
