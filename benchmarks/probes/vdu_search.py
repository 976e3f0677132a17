"""VDU's toy default, searched on all 10 concepts and 3 seeds instead of one concept and one seed.

VDU trains on the forget images alone (no retain data, by design), so what it keeps depends
entirely on how hard it pushes: the stability weight gamma, the per-sample ascent bound, the
number of steps and where the precision comes from. A setting tuned on circle at seed 0 met the bar
on circle and on no other concept. This probe runs each candidate setting through the benchmark's
own machinery (compare_toy.run_method: same prompts, evaluation seeds, base evaluations and
figures) and writes docs/lab/searches/vdu_10_concepts.md and its trade-off figure from the records.

    python benchmarks/probes/vdu_search.py                           # screen: every candidate, seed 0
    python benchmarks/probes/vdu_search.py --candidates b10 --seeds 1 2     # confirm one on 3 seeds
    python benchmarks/probes/vdu_search.py --report-only             # rewrite the doc from the records

Records: benchmarks/records/vdu_search/<candidate>/<concept>-seed<S>.json, except the current
default (the benchmark's own "vdu" records) and the paper's checkpoint recipe (its variant
"vdu_3_snapshots"), which are shared with the benchmark rather than run twice.

How the default is chosen (fixed before the runs): among the candidates with runs on all 10
concepts at 3 seeds, the one with the highest mean UA whose mean in-domain retain drop is at most
10 points; if none keeps the drop that low, the one with the most runs meeting the bar (ties: the
smaller mean drop), and the doc says the issue's bar is not met.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import compare_toy as bench  # noqa: E402

# candidate -> (record name, extra vdu.py arguments); None: a record name the benchmark already owns.
# The default was gamma 0.5 until 2026-12-02, when this search chose 0.35 (its "g0.35" runs became the
# benchmark's "vdu" records, and the old default's runs the "g0.5" candidate). Every other candidate
# changes one thing from the old default, so it names gamma 0.5 explicitly.
OLD = ["--gamma", "0.5"]
CANDIDATES = {
    "default": ("vdu", None),                        # Fisher, gamma 0.35, bound 3, 200 steps, lr 5e-4
    "g0.5": ("vdu_search/g0.5", OLD),                # the default of 2026-11-23, tuned on circle at seed 0
    "checkpoints": ("vdu_3_snapshots", None),        # the paper's recipe: the snapshots' variance
    "l2": ("vdu_search/l2", [*OLD, "--precision-from", "l2"]),   # isotropic anchor: the ablation
    "g0.2": ("vdu_search/g0.2", ["--gamma", "0.2"]),             # push harder...
    "b5": ("vdu_search/b5", [*OLD, "--ascent-bound", "5"]),      # ... or let each sample go further
    "b10": ("vdu_search/b10", [*OLD, "--ascent-bound", "10"]),
    "400-steps": ("vdu_search/400-steps", [*OLD, "--steps", "400"]),  # or longer (the anchor pulls back)
    # C_t on the noisier half only: push where a sample's content is decided
    "t500": ("vdu_search/t500", [*OLD, "--t-min", "500"]),
}
DOC = ROOT / "docs" / "lab" / "searches" / "vdu_10_concepts.md"


def register() -> None:
    """Make the search candidates known to the benchmark as VDU variants (records, labels, bar)."""
    for name, extra in CANDIDATES.values():
        if extra is not None:
            bench.VARIANTS[name] = ("vdu", extra)
            bench.METHODS_BAR[name] = "vdu"


def records() -> dict:
    """candidate -> {(concept, seed): record}."""
    out = {}
    for key, (name, _) in CANDIDATES.items():
        out[key] = {}
        for path in sorted((bench.RECORDS / name).glob("*.json")):
            rec = json.loads(path.read_text())
            out[key][(rec["concept"], rec["seed"])] = rec
    return out


def summary(recs: dict) -> dict:
    """The figures the choice is made on, over one candidate's runs."""
    figs = [bench.figures(r) for r in recs.values()]
    by_concept = {}
    for (concept, _), f in zip(recs, figs):
        by_concept.setdefault(concept, []).append(f["ua"])
    seed_sd = [float(np.std(v, ddof=1)) for v in by_concept.values() if len(v) > 1]
    return {"runs": len(figs), "concepts": len(by_concept), "seeds": sorted({s for _, s in recs}),
            "ua": bench.interval([f["ua"] for f in figs]), "drop": bench.interval([f["retain_in_drop"] for f in figs]),
            "worst": bench.interval([f["worst_drop"] for f in figs]),
            "cross": bench.interval([f["retain_cross_drop"] for f in figs]),
            "seed_sd": float(np.mean(seed_sd)) if seed_sd else float("nan"),
            "meets": int(sum(f["meets_bar"] for f in figs)),
            "time": float(np.mean([f["wall_time_s"] for f in figs])) if figs else float("nan")}


def choose(summaries: dict) -> tuple[str | None, bool]:
    """The rule in the docstring: (candidate, whether it reaches the issue's bar), or None if no
    candidate has 10 concepts x 3 seeds yet."""
    full = {k: s for k, s in summaries.items() if s["runs"] >= 30}
    if not full:
        return None, False
    keeping = {k: s for k, s in full.items() if s["drop"][0] <= 10}
    if keeping:
        best = max(keeping, key=lambda k: keeping[k]["ua"][0])
        return best, keeping[best]["ua"][0] >= 90
    return max(full, key=lambda k: (full[k]["meets"], -full[k]["drop"][0])), False


def fmt_interval(iv: tuple[float, float, float]) -> str:
    mean, low, high = iv
    return bench.fmt(mean) if math.isnan(low) else f"{bench.fmt(mean)} [{bench.fmt(low)}, {bench.fmt(high)}]"


def write_doc(all_recs: dict) -> None:
    summaries = {k: summary(r) for k, r in all_recs.items()}
    best, reached = choose(summaries)
    if best is None:
        chosen = "nothing yet: no candidate has run on 10 concepts x 3 seeds."
    else:
        chosen = (f"**{best}**. " + ("It reaches the issue's bar (mean UA >= 90%, mean in-domain retain drop <= 10 "
                  "points)." if reached else "No candidate reaches the issue's bar (mean UA >= 90% with mean "
                  "in-domain retain drop <= 10 points): the table is the trade-off VDU offers on the toy.")
                  + " The rule chose gamma 0.35 on 2026-12-02, and it became the default.")
    lines = ["# VDU on the toy: the default searched on 10 concepts and 3 seeds", "",
             "- **Question:** which setting of VDU forgets most on every toy concept and seed while keeping "
             "the concept's neighbours?",
             "- **Rule for choosing (fixed before the runs):** among the candidates with runs on all 10 concepts "
             "at 3 seeds, the highest mean UA whose mean in-domain retain drop is at most 10 points; if none "
             "keeps the drop that low, the most runs meeting the bar (ties: the smaller mean drop).",
             "- **Grid:** the candidates below, each changing one thing from the default of 2026-11-23 "
             "(Fisher precision, gamma 0.5, ascent bound 3, 200 steps, lr 5e-4; now the candidate g0.5), "
             "which was tuned on circle at seed 0 ([vdu.md](vdu.md)).",
             "- **Concepts and seeds:** the 10 toy concepts; the screen runs every candidate at seed 0, the best "
             "go on to seeds 1 and 2. Every run: `python vdu.py --model toy --concept C --seed S <the "
             "candidate's arguments>`, evaluated by the benchmark (64 images per group, the same prompts and "
             "seeds as every other method).",
             "- **Command:** `python benchmarks/probes/vdu_search.py` (runs what has no record yet); "
             "`python benchmarks/probes/vdu_search.py --report-only` writes this file and its figure from the "
             "records in `benchmarks/records/` (vdu, vdu_3_snapshots and vdu_search/): do not edit it by hand.",
             "- **Chosen:** " + chosen,
             "", "Intervals: mean [95% t-interval over the runs]. Seed sd: the mean over concepts of UA's "
             "standard deviation across seeds.", "",
             "| candidate | arguments | runs | seeds | UA (%) | in-domain retain drop (pts) | worst in-domain value "
             "drop (pts) | cross-domain retain drop (pts) | seed sd of UA (pts) | runs meeting the bar | wall time (s) |",
             "|---" * 11 + "|"]
    for key, s in summaries.items():
        if not s["runs"]:
            continue
        name, extra = CANDIDATES[key]
        args = " ".join(bench.VARIANTS.get(name, ("vdu", []))[1]) if extra is None else " ".join(extra)
        lines.append(f"| {key} | `{args or '(the default)'}` | {s['runs']} | {','.join(map(str, s['seeds']))} | "
                     + " | ".join(fmt_interval(s[k]) for k in ("ua", "drop", "worst", "cross"))
                     + f" | {bench.fmt(s['seed_sd']) if not math.isnan(s['seed_sd']) else '-'} | "
                     f"{s['meets']}/{s['runs']} | {bench.fmt(s['time'], 0)} |")
    lines += ["", "![in-domain retain drop against UA, per candidate](vdu_10_concepts.png)"]
    lines += ["", "## Per concept, UA / in-domain retain drop (mean over the seeds run)", "",
              "| candidate | " + " | ".join(bench.CONCEPTS) + " |", "|---" * (len(bench.CONCEPTS) + 1) + "|"]
    for key, recs in all_recs.items():
        if not recs:
            continue
        cells = []
        for concept in bench.CONCEPTS:
            f = [bench.figures(r) for (c, _), r in recs.items() if c == concept]
            cells.append("-" if not f else f"{np.mean([x['ua'] for x in f]):.0f} / "
                         f"{np.mean([x['retain_in_drop'] for x in f]):.0f}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    DOC.write_text("\n".join(lines) + "\n")
    flat = {(CANDIDATES[k][0], c, s): r for k, recs in all_recs.items() for (c, s), r in recs.items()}
    keys = [k for k in CANDIDATES if all_recs[k]]
    by_name = {CANDIDATES[k][0]: k for k in keys}
    bench.tradeoff_figure(flat, DOC.with_suffix(".png"), [CANDIDATES[k][0] for k in keys], lambda n: by_name[n])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", nargs="*", default=list(CANDIDATES), choices=list(CANDIDATES),
                   help="candidate settings to run (default: all)")
    p.add_argument("--concepts", nargs="*", default=bench.CONCEPTS, choices=bench.CONCEPTS, help="toy concepts")
    p.add_argument("--seeds", nargs="*", type=int, default=[0], help="seeds (default: 0, the screen)")
    p.add_argument("--report-only", action="store_true", help="run nothing: rewrite the doc from the records")
    a = p.parse_args()
    register()
    if not a.report_only:
        ev = None
        for seed in a.seeds:
            for concept in a.concepts:
                for key in a.candidates:
                    name = CANDIDATES[key][0]
                    if bench.record_path(name, concept, seed).exists():
                        continue
                    ev = ev or bench.Evaluator()
                    bench.run_method(name, concept, seed, ev)
    write_doc(records())
    print(f"wrote {DOC} and {DOC.with_suffix('.png')}")


if __name__ == "__main__":
    main()
