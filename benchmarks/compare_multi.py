"""Several concepts in one run, and one after another, on the toy: every method and both baselines.

    python benchmarks/compare_multi.py --seeds 3 4 5     # the held-out seeds: the headline
    python benchmarks/compare_multi.py                   # the development seeds 0-2
    python benchmarks/compare_multi.py --report-only     # docs/results/multi.md from the records

The sets and the sequence were fixed before any run: a shape with a texture (circle + striped),
entangled neighbours (circle + diamond: the toy's judge and UNet confuse them most), three of mixed
kinds (square + triangle + dotted), and a sequence of three stages (circle, then striped, then
square), each stage continuing the last (`--model <run folder>`). Every run uses the method's
default toy settings (how each loss generalises to several concepts: its doc's "Several concepts").
Nothing here is tuned: every choice was fixed before any run, so the held-out seeds 3-5 alone carry
the result; the development seeds 0-2 are for whoever revisits a choice, and must then be the only
seeds looked at.

A multi-concept run is `python <script> --model toy --concept A --concept B --seed s` with its own
report (each concept's UA; retain over the values none of the concepts names). A sequence runs its
three stages; the last stage's report holds every earlier concept's UA now and right after its own
stage (resurgence is the fall between the two). Records: benchmarks/records/multi/<method>/
<set>-seed<s>.json and sequence-<sequence>-seed<s>.json (metrics, commands, commit, times; no
weights), committed; a record that exists is not redone.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import eval as evaluation  # noqa: E402
from benchmarks.compare_toy import (MULTI_RECORDS as RECORDS, RECORDS as SINGLE, SEEDS, TEST_SEEDS, commit,  # noqa: E402
                                    concept_means, finish, fmt, holm, require_clean_tree, shard, write_json)

METHODS = ["pure", "mim_mu", "vdu", "rl_critic", "esd", "salun"]
SETS = [["circle", "striped"], ["circle", "diamond"], ["square", "triangle", "dotted"]]
SEQUENCE = ["circle", "striped", "square"]
RESURGENCE_BAR = 10.0  # points: an earlier concept's UA may fall at most this far below its own stage's
WORK = ROOT / "outputs" / "multi"
DOC = ROOT / "docs" / "results" / "multi.md"
# MiM-MU's claims here come from a summary of its paper, not its abstract or a table: in sequential
# and multi-concept unlearning it suffers neither concept resurgence nor degradation of unrelated
# concepts, unlike SalUn. Tested against SalUn and every other method, each paired on its units.
CLAIMANT, RIVAL = "mim_mu", "salun"


def slug(concepts: list[str]) -> str:
    return "-".join(concepts)


def train(method: str, model: str, concepts: list[str], seed: int, out: Path) -> tuple[dict, list[str]] | None:
    """One run of `method` with its own report; (metrics.json, the command's arguments), or None."""
    script = evaluation.METHODS[method]["script"]
    args = [script, "--model", model, *[f for c in concepts for f in ("--concept", c)], "--seed", str(seed)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".log"), "w") as f:
        r = subprocess.run([sys.executable, *args, "--output-dir", str(out), "--overwrite"], cwd=ROOT, stdout=f,
                           stderr=subprocess.STDOUT)
    if r.returncode != 0:
        print(f"  {method} {' + '.join(concepts)} seed {seed}: FAILED, see {out.with_suffix('.log')}")
        return None
    return json.loads((out / "metrics.json").read_text()), args


def run_set(method: str, concepts: list[str], seed: int) -> dict | None:
    done = train(method, "toy", concepts, seed, WORK / f"{method}-{slug(concepts)}-seed{seed}")
    if done is None:
        return None
    metrics, args = done
    rec = {"method": method, "concepts": concepts, "seed": seed, "commit": commit(),
           "command": " ".join(["python", *args]), "wall_time_s": metrics["wall_time_s"],
           # training alone (the report evaluates each concept apart), as the one-concept records time it
           "train_time_s": round(metrics["wall_time_s"] - metrics["eval_time_s"], 1), "metrics": metrics}
    write_json(RECORDS / method / f"{slug(concepts)}-seed{seed}.json", rec)
    print(f"  {method} {' + '.join(concepts)} seed {seed}: UA "
          + ", ".join(f"{c} {m['unlearned']['ua']:.0%}" for c, m in metrics["concepts"].items())
          + f", {rec['wall_time_s']:.0f}s", flush=True)
    return rec


def run_sequence(method: str, seed: int) -> dict | None:
    stages, model = [], "toy"
    for i, concept in enumerate(SEQUENCE):
        out = WORK / f"{method}-sequence{i + 1}-{concept}-seed{seed}"
        done = train(method, model, [concept], seed, out)
        if done is None:
            return None
        metrics, args = done
        stages.append({"concept": concept, "command": " ".join(["python", *args]).replace(str(WORK), "outputs/multi"),
                       "wall_time_s": metrics["wall_time_s"], "metrics": metrics})
        model = str(out)
    rec = {"method": method, "sequence": SEQUENCE, "seed": seed, "commit": commit(), "stages": stages}
    write_json(RECORDS / method / f"sequence-{slug(SEQUENCE)}-seed{seed}.json", rec)
    print(f"  {method} sequence seed {seed}: " + "; ".join(
        f"{c} {ua:.0f}" for c, ua in stage_uas(rec)[-1].items()), flush=True)
    for i, concept in enumerate(SEQUENCE):  # the chain's folders: no longer needed once recorded
        shutil.rmtree(WORK / f"{method}-sequence{i + 1}-{concept}-seed{seed}", ignore_errors=True)
    return rec


def stage_uas(rec: dict) -> list[dict]:
    """UA (%) of every concept erased so far, after each stage of a sequence record."""
    out = []
    for stage in rec["stages"]:
        m = stage["metrics"]
        now = {c: 100 * row["now"]["ua"] for c, row in m.get("earlier", {}).items()}
        out.append({**now, stage["concept"]: 100 * m["unlearned"]["ua"]})
    return out


def resurgence(rec: dict) -> float:
    """The largest fall of an earlier concept's UA, from right after its own stage to the end (points)."""
    uas = stage_uas(rec)
    return max(uas[i][c] - uas[-1][c] for i, c in enumerate(rec["sequence"][:-1]))


def load(seeds: list[int]) -> dict:
    out = {}
    for path in sorted(RECORDS.glob("*/*.json")):
        rec = json.loads(path.read_text())
        if rec["seed"] in seeds:
            out[(rec["method"], path.stem.rsplit("-seed", 1)[0], rec["seed"])] = rec
    return out


def spread(values: list[float], digits: int = 1) -> str:
    """mean (min to max): three seeds of one set are one unit, so no interval is drawn from them."""
    if not values:
        return "-"
    if len(values) == 1:
        return fmt(values[0], digits)
    return f"{fmt(np.mean(values), digits)} ({fmt(min(values), digits)} to {fmt(max(values), digits)})"


def singles(method: str, concepts: list[str], seeds: list[int]) -> dict | None:
    """The method's one-concept benchmark records of these concepts and seeds, by (concept, seed)
    (None unless every one was recorded)."""
    paths = {(c, s): SINGLE / method / f"{c}-seed{s}.json" for c in concepts for s in seeds}
    if not all(p.exists() for p in paths.values()):
        return None
    return {key: json.loads(p.read_text()) for key, p in paths.items()}


def in_domain_drop(report: dict) -> float:
    """Points of in-domain retain a report's unlearned model lost against its base."""
    return 100 * (report["base"]["retain_in"] - report["unlearned"]["retain_in"])


def alone_row(recs: dict, concepts: list[str], seeds: list[int]) -> list[str]:
    """The same concepts erased one per run (`recs`: singles'): each concept's UA, the in-domain drop
    (per seed, the mean over the concepts) and whether every UA reaches the bar."""
    ua = lambda c: [100 * recs[c, s]["unlearned"]["ua"] for s in seeds]  # noqa: E731
    drops = [np.mean([in_domain_drop(recs[c, s]) for c in concepts]) for s in seeds]
    forgets = all(np.mean(ua(c)) >= 100 * evaluation.BAR_UA for c in concepts)
    return [*[spread(ua(c)) for c in concepts], spread(drops), "yes" if forgets else "no"]


def report(records: dict, seeds: list[int]) -> list[str]:
    label = lambda m: evaluation.METHODS[m]["label"]  # noqa: E731
    lines = []
    for concepts in SETS:
        rows, alone_rows = [], []
        for method in METHODS:
            recs = [r for (m, s, _), r in sorted(records.items()) if m == method and s == slug(concepts)]
            if not recs:
                continue
            # per seed: the mean over the set's concepts (each concept's report keeps what none of them names)
            per = lambda f: [np.mean([f(r["metrics"]["concepts"][c]) for c in concepts]) for r in recs]  # noqa: E731
            uas = [spread([100 * r["metrics"]["concepts"][c]["unlearned"]["ua"] for r in recs]) for c in concepts]
            drop = spread(per(in_domain_drop))
            cross = spread(per(lambda m: 100 * (m["base"]["retain_cross"] - m["unlearned"]["retain_cross"])))
            seeds_run = [r["seed"] for r in recs]
            single = singles(method, concepts, seeds_run)
            time_alone = np.mean([x["train_time_s"] for x in single.values()]) if single else None
            ratio = fmt(np.mean([r["train_time_s"] for r in recs]) / time_alone, 2) if single else "-"
            if single:  # the same concepts erased one per run, from the records just read
                alone_rows.append([label(method), *alone_row(single, concepts, seeds_run)])
            forgets = all(np.mean([r["metrics"]["concepts"][c]["unlearned"]["ua"] for r in recs]) >= evaluation.BAR_UA
                          for c in concepts)
            rows.append([label(method), *uas, drop, cross, ratio, f"{len(recs)}", "yes" if forgets else "no"])
        if rows:
            lines += [f"### {' + '.join(concepts)}", "",
                      evaluation.markdown_table(["method", *[f"UA {c} (%)" for c in concepts],
                                                 "in-domain drop, never erased (pts)", "cross-domain drop (pts)",
                                                 "training time / one concept's", "seeds", "every UA >= 90%"],
                                                rows), ""]
        if alone_rows:
            lines += ["The same concepts erased one per run (the one-concept benchmark's runs, same seeds): "
                      "what the method reaches on each concept alone, the in-domain drop over the values of "
                      "each concept's kind but that concept (per seed, the mean over the concepts).", "",
                      evaluation.markdown_table(["method", *[f"UA {c} alone (%)" for c in concepts],
                                                 "in-domain drop alone (pts)", "every UA >= 90% alone"],
                                                alone_rows), ""]
    rows = []
    for method in METHODS:
        recs = sequence_records(records, method)
        if not recs:
            continue
        uas = [stage_uas(r) for r in recs]
        cells = [spread([u[i][c] for u in uas], 0) for c_i, c in enumerate(SEQUENCE) for i in range(c_i, 3)]
        worst = max(concept_means(resurgence_units(recs)))
        rows.append([label(method), *cells, fmt(worst), spread([sequence_drop(r) for r in recs]), f"{len(recs)}",
                     "yes" if worst <= RESURGENCE_BAR else "no"])
    if rows:
        figure = f"multi_sequence_seeds{seeds[0]}-{seeds[-1]}.png"
        stages = [f"{c} after {i + 1}" for c_i, c in enumerate(SEQUENCE) for i in range(c_i, 3)]
        lines += [f"### One after another: {' -> '.join(SEQUENCE)}", "",
                  "UA (%) of each erased concept after each stage; resurgence: the largest fall of an earlier "
                  "concept's UA from right after its own stage to the end (points, each concept's mean over "
                  "seeds); in-domain drop: after the last stage, over the values of its kind never erased, "
                  f"against the original base model; no resurgence: that fall at most {RESURGENCE_BAR:.0f} points.",
                  "", evaluation.markdown_table(["method", *stages, "resurgence (pts)",
                                                 "in-domain drop, never erased (pts)", "seeds", "no resurgence"],
                                                rows), "",
                  f"![each erased concept's UA after each stage]({figure})", ""]
        sequence_figure(records, DOC.parent / figure)
    claims = claims_rows(records)
    if claims:
        lines += ["### MiM-MU's claims", "",
                  "From a summary of the MiM-MU paper (not its abstract or a table): in sequential and "
                  "multi-concept unlearning it suffers neither concept resurgence nor degradation of unrelated "
                  "concepts, unlike SalUn. First its own bars (means over seeds, no interval), then paired "
                  "comparisons, the other method's figure minus MiM-MU's (above 0: the claimed side), on the "
                  "seeds both ran: resurgence on the sequence's earlier concepts (circle, striped: 2 units), "
                  "degradation on the three sets and the sequence (4 units, each one's in-domain drop over the "
                  "values never erased); seeds are averaged within a unit first. With 2 or 4 units an interval "
                  "is wide: inconclusive is expected unless the gap is large. Holm's correction within two "
                  "families: the claim itself (against SalUn), and the other methods beside it.", "",
                  evaluation.markdown_table(["claim", "units", "figure [95%]", "verdict", "verdict (Holm)"], claims),
                  ""]
    return lines


def sequence_records(records: dict, method: str) -> list[dict]:
    """The method's records of the sequence, one per seed."""
    return [r for (m, s, _), r in sorted(records.items()) if m == method and s == f"sequence-{slug(SEQUENCE)}"]


def sequence_drop(rec: dict) -> float:
    """After the last stage of a sequence: the in-domain retain drop (points) over the values of its
    kind that no stage erased, against the original base model."""
    return in_domain_drop(rec["stages"][-1]["metrics"])


def resurgence_units(recs: list[dict]) -> dict:
    """{(earlier concept, seed): its fall (points) from right after its own stage to the sequence's end}."""
    out = {}
    for r in recs:
        uas = stage_uas(r)
        out.update({(c, r["seed"]): uas[i][c] - uas[-1][c] for i, c in enumerate(SEQUENCE[:-1])})
    return out


def degradation_units(records: dict, method: str) -> dict:
    """{(set or "sequence", seed): the in-domain retain drop (points) over the values none of its
    concepts names (a set's concepts averaged)}."""
    out = {}
    for (m, name, seed), r in sorted(records.items()):
        if m != method:
            continue
        if name == f"sequence-{slug(SEQUENCE)}":
            out[("sequence", seed)] = sequence_drop(r)
        elif name in [slug(c) for c in SETS]:
            reports = r["metrics"]["concepts"].values()
            out[(name, seed)] = float(np.mean([in_domain_drop(rep) for rep in reports]))
    return out


def claims_rows(records: dict) -> list[list[str]]:
    """MiM-MU's two claims: its own bars (means over seeds, no interval), then paired against SalUn
    and each other method on the (unit, seed) pairs both have, seeds averaged within a unit, signed
    so that above 0 is the claimed side (the other's figure minus MiM-MU's)."""
    label = lambda m: evaluation.METHODS[m]["label"]  # noqa: E731
    bar_drop = 100 * evaluation.BAR_RETAIN_DROP[CLAIMANT]
    own = {"resurgence": resurgence_units(sequence_records(records, CLAIMANT)),
           "degradation": degradation_units(records, CLAIMANT)}
    rows = []
    if own["resurgence"]:
        worst = max(concept_means(own["resurgence"]))
        rows.append([f"MiM-MU: no resurgence (every earlier concept's fall <= {RESURGENCE_BAR:.0f} points)",
                     str(len(concept_means(own["resurgence"]))), f"largest fall {fmt(worst)}",
                     "holds" if worst <= RESURGENCE_BAR else "fails", "- (a bar)"])
    if own["degradation"]:
        worst = max(concept_means(own["degradation"]))
        rows.append([f"MiM-MU: no degradation of unrelated concepts (never-erased drop <= {bar_drop:.0f} points, "
                     "its bar)", str(len(concept_means(own["degradation"]))), f"largest drop {fmt(worst)}",
                     "holds" if worst <= bar_drop else "fails", "- (a bar)"])
    families = {RIVAL: [], "others": []}
    for other in [RIVAL] + [m for m in METHODS if m not in (CLAIMANT, RIVAL)]:
        theirs = {"resurgence": resurgence_units(sequence_records(records, other)),
                  "degradation": degradation_units(records, other)}
        for metric, text in (("resurgence", "resurges less than"), ("degradation", "degrades unrelated concepts "
                                                                                   "less than")):
            pairs = {k: theirs[metric][k] - v for k, v in own[metric].items() if k in theirs[metric]}
            if pairs:
                means = concept_means(pairs)  # each unit's mean over its seeds
                families[RIVAL if other == RIVAL else "others"].append(
                    finish("MiM-MU", f"{text} {label(other)}", metric, other, "summary", +1, means,
                           list(pairs), 0.95, len(means)))
    for c in holm(families[RIVAL]) + holm(families["others"]):
        figure = "-" if c["n"] < 2 else f"{fmt(c['mean'])} [{fmt(c['low'])}, {fmt(c['high'])}]"
        rows.append([f"MiM-MU {c['claim']}", str(c["n"]), figure, c["verdict"], c["holm_verdict"]])
    return rows


def sequence_figure(records: dict, path: Path) -> None:
    """One panel per method: each erased concept's UA (mean over seeds) after each stage, from its
    own stage on, and each stage's in-domain retain (grey, dashed: over the values of that stage's
    kind not erased so far, so stage 2's are textures). Drawn with PIL: no plotting dependency."""
    from PIL import Image, ImageDraw
    shown = [m for m in METHODS if sequence_records(records, m)]
    if not shown:
        return
    pw, ph, cols = 260, 200, 3
    rows_n = (len(shown) + cols - 1) // cols
    img = Image.new("RGB", (cols * pw, rows_n * ph + 40), "white")
    d = ImageDraw.Draw(img)
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44)]
    d.text((6, 6), "UA (%) of each erased concept after each stage; grey dashed: each stage's in-domain retain (%) "
                   "over its kind's values not erased so far", fill="black")
    for x, (c, col) in enumerate(zip(SEQUENCE, colours)):
        d.text((6 + 130 * x, 22), c, fill=col)
    for k, method in enumerate(shown):
        recs = sequence_records(records, method)
        left, top = (k % cols) * pw + 40, (k // cols) * ph + 60
        w, h = pw - 60, ph - 50
        px = lambda i: left + w * i / 2  # noqa: E731
        py = lambda v: top + h * (1 - v / 100)  # noqa: E731
        d.rectangle([left, top, left + w, top + h], outline=(160, 160, 160))
        d.text((left, top - 14), evaluation.METHODS[method]["label"], fill="black")
        for v in (0, 50, 100):
            d.text((left - 26, py(v) - 6), str(v), fill=(120, 120, 120))
        for i in range(3):
            d.text((px(i) - 3, top + h + 4), str(i + 1), fill=(120, 120, 120))
        uas = [stage_uas(r) for r in recs]
        for c_i, (c, col) in enumerate(zip(SEQUENCE, colours)):
            pts = [(px(i), py(np.mean([u[i][c] for u in uas]))) for i in range(c_i, 3)]
            if len(pts) > 1:
                d.line(pts, fill=col, width=2)
            for p in pts:
                d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=col)
        retain = [py(100 * np.mean([r["stages"][i]["metrics"]["unlearned"]["retain_in"] for r in recs]))
                  for i in range(3)]
        for i in range(2):
            for f in (0.0, 0.4, 0.8):  # dashes: a fifth of the way on, a fifth off
                d.line([(px(i + f), retain[i] + (retain[i + 1] - retain[i]) * f),
                        (px(i + f + 0.2), retain[i] + (retain[i + 1] - retain[i]) * (f + 0.2))],
                       fill=(130, 130, 130), width=2)
    img.save(path, optimize=False)


def write_page() -> bool:
    page = ["# Several concepts, and one after another (toy)", "",
            "Written by `python benchmarks/compare_multi.py --report-only` from `benchmarks/records/multi/`. "
            "Every method at its default toy settings. Figures are means over seeds with their range (min "
            "to max): one concept set is one unit, so its seeds give no interval. In-domain drop: over the "
            "values of each concept's kind that none of the erased concepts names; training time (the run less "
            "its report) over the mean training time of the same method's one-concept benchmark runs of "
            "these concepts and seeds.", ""]
    found = False
    for seeds, name in ((TEST_SEEDS, "Held-out seeds 3-5"), (SEEDS, "Development seeds 0-2")):
        section = report(load(seeds), seeds)
        if section:
            page += [f"## {name}", ""] + section
            found = True
    if found:
        DOC.write_text("\n".join(page))
    return found


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS)
    p.add_argument("--seeds", nargs="*", type=int, default=SEEDS)
    p.add_argument("--no-sequence", action="store_true", help="the multi-concept sets only")
    p.add_argument("--report-only", action="store_true", help="write docs/results/multi.md, run nothing")
    p.add_argument("--shard", metavar="K/N", help="run only the K-th of N slices of the (seed, method) units")
    p.add_argument("--allow-dirty", action="store_true", help="run from a tree with uncommitted changes")
    args = p.parse_args()
    if not args.report_only:
        require_clean_tree(args.allow_dirty)
        for seed, method in shard([(s, m) for s in args.seeds for m in args.methods], args.shard):
            for concepts in SETS:
                if not (RECORDS / method / f"{slug(concepts)}-seed{seed}.json").exists():
                    run_set(method, concepts, seed)
            if not args.no_sequence and not (RECORDS / method / f"sequence-{slug(SEQUENCE)}-seed{seed}.json").exists():
                run_sequence(method, seed)
    print(f"wrote {DOC}" if write_page() else "no records yet")


if __name__ == "__main__":
    try:
        main()
    except common.UsageError as e:
        raise SystemExit(f"error: {e}")
