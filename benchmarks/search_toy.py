"""A grid search of one method's toy settings over several concepts and seeds, the way the toy
defaults of every method and baseline are chosen (never on one concept or one seed).

    python benchmarks/search_toy.py esd --grid lr=1e-5,3e-5,1e-4 steps=150 \\
        --concepts circle square striped dotted --seeds 0 --records docs/lab/searches/esd.jsonl

Every (setting, concept, seed) run is `python <method script> --model toy --concept <c> --seed <s>
<setting>`; its metrics are appended as one JSON line to --records (the weights are deleted), so
the search resumes where it stopped and its table can be rebuilt from the records alone
(`--report-only`). The table: per setting, mean UA, mean in-domain retain drop, mean drop of the
worst in-domain value, and the runs that meet the method's bar (eval.meets_bar).
"""

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as evaluation  # noqa: E402


def parse_grid(items: list[str]) -> list[dict]:
    """["lr=1e-5,3e-5", "steps=100"] -> every combination, as {flag: value} dicts."""
    axes = []
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--grid takes name=v1,v2,... items, got {item!r}.")
        name, values = item.split("=", 1)
        axes.append([(name, v) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)] or [{}]


def key(setting: dict) -> str:
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(setting.items())) or "(defaults)"


def run_one(method: str, setting: dict, concept: str, seed: int, work: Path, log: Path) -> dict | None:
    out = work / f"{method}-{concept}-{seed}"
    script = evaluation.METHODS[method]["script"]
    cmd = [sys.executable, script, "--model", "toy", "--concept", concept, "--seed", str(seed),
           "--output-dir", str(out), "--overwrite"]
    for k, v in setting.items():
        cmd += [f"--{k.replace('_', '-')}", v]
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        print(f"  FAILED ({r.returncode}) after {time.time() - t0:.0f}s: see {log}")
        return None
    m = json.loads((out / "metrics.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return m


def table(method: str, records: list[dict]) -> str:
    by_setting = {}
    for r in records:
        by_setting.setdefault(r["setting"], []).append(r)
    rows = []
    for s, rs in by_setting.items():
        def mean(f):
            return float(np.mean([f(r["metrics"]) for r in rs]))
        ua = mean(lambda m: m["unlearned"]["ua"])
        drop = mean(lambda m: m["base"]["retain_in"] - m["unlearned"]["retain_in"])
        worst = mean(lambda m: evaluation.worst_drop(m)[1])  # the neighbour damaged most
        cross = mean(lambda m: m["base"]["retain_cross"] - m["unlearned"]["retain_cross"])
        meets = sum(evaluation.meets_bar(method, r["metrics"]) for r in rs)
        wall = mean(lambda m: m["wall_time_s"])
        rows.append([f"`{s}`", str(len(rs)), f"{ua:.0%}", f"{drop * 100:+.1f}", f"{worst * 100:+.1f}",
                     f"{cross * 100:+.1f}", f"{meets}/{len(rs)}", f"{wall:.0f}"])
    return evaluation.markdown_table(["setting", "runs", "UA", "in-domain retain drop", "worst-value drop",
                                      "cross-domain drop", "meets bar", "wall time (s)"], rows)


def per_run(records: list[dict]) -> str:
    rows = []
    for r in records:
        m = r["metrics"]
        u, b = m["unlearned"], m["base"]
        rows.append([f"`{r['setting']}`", r["concept"], str(r["seed"]), f"{u['ua']:.0%}",
                     f"{u['retain_in']:.0%} ({b['retain_in']:.0%})",
                     f"{u['retain_in_worst_value']} {u['retain_in_worst']:.0%}", f"{m['wall_time_s']:.0f}"])
    return evaluation.markdown_table(["setting", "concept", "seed", "UA", "retain in (base)", "worst value",
                                      "wall (s)"], rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=list(evaluation.METHODS), help="the method or baseline to search")
    p.add_argument("--grid", nargs="*", default=[], help="name=v1,v2 ... (flags without --, '_' or '-')")
    p.add_argument("--concepts", nargs="*", default=["circle", "square", "striped", "dotted"])
    p.add_argument("--seeds", nargs="*", type=int, default=[0])
    p.add_argument("--records", required=True, help="JSON-lines file the runs are appended to (and resumed from)")
    p.add_argument("--report-only", action="store_true", help="print the table of the records, run nothing")
    p.add_argument("--per-run", action="store_true", help="also print one row per run")
    args = p.parse_args()
    path = Path(args.records)
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    if not args.report_only:
        path.parent.mkdir(parents=True, exist_ok=True)
        done = {(r["setting"], r["concept"], r["seed"]) for r in records}
        work = ROOT / "outputs" / "search"
        work.mkdir(parents=True, exist_ok=True)
        log = work / f"{args.method}.log"
        for setting in parse_grid(args.grid):
            for concept, seed in itertools.product(args.concepts, args.seeds):
                if (key(setting), concept, seed) in done:
                    continue
                m = run_one(args.method, setting, concept, seed, work, log)
                if m is None:
                    continue
                rec = {"method": args.method, "setting": key(setting), "concept": concept, "seed": seed, "metrics": m}
                records.append(rec)
                with open(path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                u = m["unlearned"]
                print(f"{key(setting)} | {concept} s{seed}: UA {u['ua']:.0%}, retain in {u['retain_in']:.0%} "
                      f"(base {m['base']['retain_in']:.0%}), worst {u['retain_in_worst_value']} "
                      f"{u['retain_in_worst']:.0%}, {m['wall_time_s']:.0f}s", flush=True)
    records = [r for r in records if r["method"] == args.method]
    print(table(args.method, records))
    if args.per_run:
        print()
        print(per_run(records))


if __name__ == "__main__":
    main()
