"""Reproduces docs/results.md and docs/compare.png: every method with its default toy settings on
every shape and texture concept (seed 0), one table per method and the averages.

    python benchmarks/compare_toy.py                       # all four methods, all 10 concepts
    python benchmarks/compare_toy.py --methods pure --quick  # one method, circle + striped

Resumes: a run whose outputs/<method>-<concept>/metrics.json exists is reused, not recomputed.
Writes a markdown report (per-concept tables and per-method averages) to --results, with the
date, the machine and the command. Each run's console output goes to outputs/<run>.log.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import eval as evaluation  # noqa: E402
from toy import world  # noqa: E402

METHODS = ["pure", "mim_mu", "vdu", "rl_critic"]
COLS = [("ua", "UA"), ("ua_synonym", "synonym UA"), ("retain_in", "retain in"), ("retain_cross", "retain cross"),
        ("clip_forget", "CLIP forget"), ("clip_retain", "CLIP retain"), ("fd_clip", "FD-CLIP"),
        ("wall_time_s", "wall time (s)")]


def fmt(key, v):
    if v is None:
        return "-"
    return f"{v:.0%}" if key in ("ua", "ua_synonym", "retain_in", "retain_cross") else f"{v:.1f}"


def run(method: str, concept: str, outputs: Path, extra: list[str], reuse_only: bool = False) -> dict:
    out = outputs / f"{method}-{concept}"
    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    if reuse_only:
        return {}
    log = outputs / f"{method}-{concept}.log"
    cmd = [sys.executable, f"{method}.py", "--model", "toy", "--concept", concept, "--output-dir", str(out),
           "--overwrite", *extra]
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        print(f"  {method} {concept}: FAILED after {time.time() - t0:.0f}s, see {log}")
        return {}
    m = json.loads((out / "metrics.json").read_text())
    u = m["unlearned"]
    print(f"  {method} {concept}: UA {u['ua']:.0%} (base {m['base']['ua']:.0%}), retain in {u['retain_in']:.0%} "
          f"(base {m['base']['retain_in']:.0%}), {m['wall_time_s']:.0f}s")
    return m


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS, help="methods to run")
    p.add_argument("--concepts", nargs="*", default=world.SHAPES + world.TEXTURES, help="toy concepts")
    p.add_argument("--quick", action="store_true", help="only circle and striped")
    p.add_argument("--outputs", default="outputs", help="where runs are saved (and reused from)")
    p.add_argument("--results", default="docs/results.md", help="markdown report to write")
    p.add_argument("--figure", default="docs/compare.png",
                   help="side-by-side grid for circle and striped (base + each method, same seeds)")
    p.add_argument("--reuse-only", action="store_true", help="run nothing: report the runs already in --outputs")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="arguments passed to every run")
    args = p.parse_args()
    concepts = ["circle", "striped"] if args.quick else args.concepts
    outputs = ROOT / args.outputs
    outputs.mkdir(parents=True, exist_ok=True)
    results, started = {}, time.time()
    reused = {(m, c) for m in args.methods for c in concepts if (outputs / f"{m}-{c}" / "metrics.json").exists()}
    for method in args.methods:
        print(f"{method}:")
        for c in concepts:
            results[(method, c)] = run(method, c, outputs, args.extra, args.reuse_only)
    lines = [f"# Toy benchmark: {', '.join(args.methods)}", "",
             f"Measured {datetime.date.today()} on {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
             f"default toy settings, with `python benchmarks/compare_toy.py {' '.join(sys.argv[1:])}`. "
             "Each figure: 64 images per group (forget, synonym, retain in-domain, retain cross-domain), "
             "evaluation seed 0, judged by the toy judge; CLIP = the toy CLIP. Each run is "
             "`python <method>.py --model toy --concept <concept>`" + (f" {' '.join(args.extra)}" if args.extra else "")
             + " (its console output: `outputs/<method>-<concept>.log`); runs already in `outputs/` are reused.", ""]
    header = "| concept | " + " | ".join(c for _, c in COLS) + " | meets bar |"
    rule = "|---" * (len(COLS) + 2) + "|"
    averages = {}
    for method in args.methods:
        lines += [f"## {method}", "", header, rule]
        rows = []
        for c in concepts:
            m = results[(method, c)]
            if not m:
                lines.append(f"| {c} | {'not run' if args.reuse_only else 'failed'} |" + " |" * len(COLS))
                continue
            u = {**m["unlearned"], "wall_time_s": m["wall_time_s"]}
            base = m["base"]
            u["meets"] = evaluation.meets_bar(method, m)
            rows.append(u)
            lines.append(f"| {c} | " + " | ".join(
                fmt(k, u.get(k)) + (f" ({fmt(k, base.get(k))})" if k in base else "") for k, _ in COLS)
                + f" | {'yes' if u['meets'] else 'no'} |")
        if rows:
            averages[method] = {k: float(np.mean([r[k] for r in rows if r.get(k) is not None])) for k, _ in COLS}
            averages[method]["meets"] = f"{sum(r['meets'] for r in rows)}/{len(rows)}"
        lines += ["", f"(in brackets: the base model on the same prompts and seeds; bar: UA >= "
                      f"{evaluation.BAR_UA:.0%} and in-domain retain at most "
                      f"{evaluation.BAR_RETAIN_DROP[method] * 100:.0f} points below the base)", ""]
    lines += ["## Averages over concepts", "",
              "| method | " + " | ".join(c for _, c in COLS) + " | concepts meeting the bar |", rule]
    for method, a in averages.items():
        lines.append(f"| {method} | " + " | ".join(fmt(k, a[k]) for k, _ in COLS) + f" | {a['meets']} |")
    total = sum(m.get("wall_time_s", 0) for m in results.values() if m)
    made = sum(1 for k, m in results.items() if m and k not in reused)
    lines += ["", f"Sum of the runs' wall times: {total / 60:.1f} min ({sum(1 for m in results.values() if m)} runs). "
                  f"This invocation made {made} of them and reused {len(reused)}, in {(time.time() - started) / 60:.1f} min."]
    figure_concepts = [c for c in ("circle", "striped") if all(results.get((m, c)) for m in args.methods)]
    if figure_concepts:
        # eval.py --compare's grid, one block of rows per concept (object, then style)
        blocks = [evaluation.compare_images([outputs / f"{m}-{c}" for m in args.methods]) for c in figure_concepts]
        common.image_grid(torch.cat([b[0] for b in blocks]), ROOT / args.figure,
                          [label for b in blocks for label in b[1]], blocks[0][2])
        lines.insert(4, f"![base model and each method on the same prompts and seeds]({Path(args.figure).name})\n")
        print(f"wrote {ROOT / args.figure}")
    path = ROOT / args.results
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
