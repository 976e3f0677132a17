"""How often do the two toy judges agree on the images of saved runs?

Every toy figure is the opinion of the judge (toy/judge). A second judge of another architecture
and seed (toy/judge2), trained by the same build, answers the same questions; where the two
disagree often, the figure is uncertain. This re-evaluates saved toy runs (the same prompts and
seeds as their own report, 64 images per group by default) and prints, per run, UA and in-domain
retain by each judge and the share of images on which they agree, per group, for the base model
and the unlearned one.

    python benchmarks/probes/judge_agreement.py outputs/pure-circle outputs/mim_mu-circle
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import common  # noqa: E402
import eval as evaluation  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="saved toy run folders (with unet/ and run.json)")
    p.add_argument("--n-images", type=int, default=64, help="images per group")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = p.parse_args()
    device, dtype = common.seed_and_device(0, "cpu")
    models = common.load_models("toy", device, dtype)
    rows, out = [], {}
    for run in map(Path, a.runs):
        info = json.loads((run / "run.json").read_text())
        if info["base_model"] != "toy":
            raise common.UsageError(f"{run} is not a toy run: the second judge exists only on the toy.")
        ps = common.concept_prompts(info["args"]["concept"], models)
        m = evaluation.report(models, ps, common.load_unet(run / "unet", device), None, a.n_images,
                              info["args"].get("seed", 0))
        out[str(run)] = {k: m[k]["judge_agreement"] for k in ("base", "unlearned")}
        u = m["unlearned"]["judge_agreement"]
        rows.append(f"| {run.name} (seed {m['seed']}) | {m['unlearned']['ua']:.0%} | {m['unlearned']['retain_in']:.0%} | "
                    + " | ".join(f"{u[g]:.0%}" for g in ("forget", "synonym", "retain_in", "retain_cross"))
                    + f" | {min(m['base']['judge_agreement'].values()):.0%} |")
        print(rows[-1], flush=True)
    print("\n| run | UA | retain in | agree: forget | synonym | retain in | retain cross | base, lowest group |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    common.cli(main)
