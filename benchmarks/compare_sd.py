"""The Stable Diffusion benchmark: every method and baseline at its Stable Diffusion defaults on the
two protocols the papers share, one record per run, and a report with the papers' claims rebuilt
from the records alone. The toy benchmark's machinery (compare_toy.py) pointed at a real model.

    python benchmarks/compare_sd.py                                  # every missing run, then the docs
    python benchmarks/compare_sd.py --protocols objects --methods esd pure --seeds 0   # a slice
    python benchmarks/compare_sd.py --report-only                    # docs/results/sd/ from the records
    python benchmarks/compare_sd.py --method-args "--mixed-precision bf16 --gradient-checkpointing"

The protocols (the concept table in common.py; the judges in eval.py):
- objects (PURE's and ESD's Imagenette setting): erase one of the 10 Imagenette classes, prompted
  "a photo of a {class}" and three more templates. UA = the share of its images that an ImageNet
  classifier (microsoft/resnet-50, top-1 over the 1000 classes) does not assign to the class;
  synonym UA the same for prompts that name it otherwise ("chapel" for church); in-domain retain =
  the classifier's accuracy on the other nine classes' images; cross-domain retain = CLIP zero-shot
  over the 10 artists on five artists' paintings.
- styles: erase one of 10 artists ("a painting in the style of {}", ...). UA = the share of its
  images that CLIP zero-shot over the 10 artists (openai/clip-vit-large-patch14, "a painting by {}")
  does not assign to it; in-domain retain over the other nine artists; cross-domain retain = the
  classifier on five Imagenette classes.
- Both: --n-images images per group (64), fixed seeds shared by every method; image quality as on
  the toy (KID-CLIP and FD-CLIP of the retain prompts' images against the base model's, same prompts
  and seeds, with the base model against itself on other seeds as the noise floor; CLIP scores).

A run is `python <script> --model <model> --concept <C> --seed <S> --n-eval-images 0 <--method-args>`
in its own process (train and save); its UNet is then evaluated here on the base model's prompts
and seeds and leaves benchmarks/records/sd/<method>/<concept>-seed<S>.json (every metric, the
command, the commit, the UNet's sha256, wall times, the GPU). A run whose record exists is never
redone. The evaluator's models (the pipeline, CLIP ViT-L/14, ResNet-50) are loaded after the
training process has exited and released before the next one, so training has the GPU to itself.

One run per GPU. On a cluster, each job takes a deterministic slice of the (seed, concept) units
with --shard K/N, commits its records, and the records merge by git; for example with SLURM:

    sbatch --array=1-20 --gres=gpu:1 --wrap 'python benchmarks/compare_sd.py --shard $SLURM_ARRAY_TASK_ID/20'
    git add benchmarks/records/sd && git commit   # on each job's clone; then merge them and:
    python benchmarks/compare_sd.py --report-only

No default here was tuned on Stable Diffusion (each script's SD column is its paper's or public
code's setting, or a stated reconstruction), so there are no development seeds to hold out: seed 0
is the table, and --seeds 0 1 2 adds seeds. Intervals and claims as on the toy: each concept's seeds
averaged first, a t-interval over the concepts, Holm's correction over the claims.
"""

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import eval as evaluation  # noqa: E402
from benchmarks.compare_toy import CLAIMS as TOY_CLAIMS  # noqa: E402
from benchmarks.compare_toy import (Evaluator, check_claim, claims_table, fmt, forest_figure, holm,  # noqa: E402
                                    method_table, record_path, require_clean_tree, run_method, shard,
                                    tradeoff_figure)

PROTOCOLS = {"objects": common.IMAGENETTE, "styles": common.ARTISTS}
SEEDS = [0]
N_IMAGES = 64
RECORDS = ROOT / "benchmarks" / "records" / "sd"
WORK = ROOT / "outputs" / "sd_benchmark"
# the table's columns (evaluation.COLUMNS); forget-prompt fidelity needs the toy's attributes
COLUMNS = ["ua", "ua_synonym", "retain_in_drop", "worst_drop", "retain_cross_drop", "kid_clip", "fd_clip",
           "clip_forget", "clip_retain", "wall_time_s"]
# the papers' claims (compare_toy.CLAIMS) between the methods and baselines this benchmark runs
CLAIMS = [c for c in TOY_CLAIMS if c[3] in evaluation.METHODS and (not isinstance(c[4], str) or c[4] in evaluation.METHODS)]


def hardware(device: str) -> str:
    """What the runs ran on, for the budget: the GPU's name, or the CPU."""
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()})"


def load_records(root: Path = RECORDS) -> dict:
    """(method, concept, seed) -> record, for every record under `root`."""
    out = {}
    for name in evaluation.METHODS:
        for path in sorted((root / name).glob("*.json")):
            rec = json.loads(path.read_text())
            out[(name, rec["concept"], rec["seed"])] = rec
    return out


def of_protocol(records: dict, protocol: str) -> dict:
    return {k: r for k, r in records.items() if k[1] in PROTOCOLS[protocol]}


def budget_table(records: dict, base: list[dict], seeds: list[int]) -> str:
    """GPU-hours of the full table per method (both protocols' 20 concepts x `seeds`), from the
    median measured wall time of its recorded runs (training + evaluation, each on one GPU), and
    of the base model's evaluations (`base`: its records, one per concept and seed)."""
    n_units = sum(len(c) for c in PROTOCOLS.values()) * len(seeds)
    rows = []
    if base:
        median = sorted(r["eval_time_s"] for r in base)[len(base) // 2]
        where = ", ".join(sorted({r.get("hardware", "?") for r in base}))
        rows.append(["base model (evaluation and noise floor)", str(len(base)), "-", fmt(median / 60),
                     fmt(median * n_units / 3600), where])
    for name, m in evaluation.METHODS.items():
        recs = [r for (n, _, _), r in records.items() if n == name]
        if not recs:
            continue
        train = sorted(r["train_time_s"] for r in recs)[len(recs) // 2]
        total = sorted(r["wall_time_s"] for r in recs)[len(recs) // 2]
        where = ", ".join(sorted({r.get("hardware", "?") for r in recs}))
        rows.append([m["label"], str(len(recs)), fmt(train / 60), fmt(total / 60), fmt(total * n_units / 3600), where])
    header = ["method", "runs measured", "training (min, median)", "training + evaluation (min, median)",
              f"GPU-hours for {n_units} runs", "hardware"]
    return evaluation.markdown_table(header, rows)


def write_docs(records: dict, base: list[dict], docs: Path, seeds: list[int]) -> None:
    """docs/results/sd/: results.md (per protocol: the method table, the trade-off figure), claims.md
    (each claim per protocol, Holm over all of them, the forest figure) and the budget."""
    docs.mkdir(parents=True, exist_ok=True)
    out = ["# Stable Diffusion: every method at its SD defaults", "",
           "Written by `python benchmarks/compare_sd.py --report-only` from `benchmarks/records/sd/` "
           "(the protocol: the docstring of `benchmarks/compare_sd.py`). Means with 95% t-intervals over the "
           "concepts (each concept's seeds averaged first); drops in points below the base model.", ""]
    if not records:
        out += ["No run is recorded yet.", ""]
    claims = []
    for protocol in PROTOCOLS:
        recs = of_protocol(records, protocol)
        if not recs:
            continue
        models = sorted({r.get("model", "?") for r in recs.values()})
        out += [f"## {protocol} ({len(PROTOCOLS[protocol])} concepts; model {', '.join(models)})", "",
                method_table(recs, list(evaluation.METHODS), COLUMNS), "",
                f"![in-domain retain drop against UA, {protocol}](tradeoff_{protocol}.png)", ""]
        tradeoff_figure(recs, docs / f"tradeoff_{protocol}.png", zoom=None)
        seeds_here = sorted({s for (_, _, s) in recs})
        claims += [{**check_claim(recs, c), "seeds": seeds_here, "paper": f"{c[0]} ({protocol})"} for c in CLAIMS]
    out += ["## Budget", "", budget_table(records, base, seeds), ""]
    (docs / "results.md").write_text("\n".join(out) + "\n")
    holm(claims)
    lines = ["# The papers' claims on Stable Diffusion", "",
             "Written by `python benchmarks/compare_sd.py --report-only`, as the toy's claims are (its "
             "claims.md explains the columns): each claim on each protocol's paired (concept, seed) units, "
             "Holm's correction over all rows.", "",
             "![each claim's difference with its 95% and Holm intervals](forest.png)", "",
             claims_table(claims) if claims else "No run is recorded yet."]
    (docs / "claims.md").write_text("\n".join(lines) + "\n")
    if claims:
        forest_figure(claims, docs / "forest.png")


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocols", nargs="*", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    p.add_argument("--methods", nargs="*", default=list(evaluation.METHODS), choices=list(evaluation.METHODS))
    p.add_argument("--concepts", nargs="*", help="a subset of the protocols' concepts (default: all of them)")
    p.add_argument("--seeds", nargs="*", type=int, default=SEEDS, help="run seeds (default: 0)")
    p.add_argument("--model", default=common.DEFAULT_MODEL, help="the SD model (hub id or local folder)")
    p.add_argument("--clip", default=evaluation.SD_CLIP, help="the CLIP of the style judge and the quality figures")
    p.add_argument("--classifier", default=evaluation.SD_RESNET, help="the ImageNet classifier judging objects")
    p.add_argument("--n-images", type=int, default=N_IMAGES, help="images per evaluation group")
    p.add_argument("--method-args", default="", help="appended to every method's command line, e.g. memory "
                   "flags: \"--mixed-precision bf16 --gradient-checkpointing\" (then part of every record)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="the evaluation's device")
    p.add_argument("--records", default=str(RECORDS), help="where the records are (and go)")
    p.add_argument("--work", default=str(WORK), help="where the runs' weights and logs go (not committed)")
    p.add_argument("--docs", default="docs/results/sd", help="where results.md, claims.md and the figures go")
    p.add_argument("--shard", metavar="K/N", help="run only the K-th of N deterministic slices of the (seed, "
                   "concept) units (one per GPU of a job array); the records merge by git")
    p.add_argument("--report-only", action="store_true", help="run nothing: rewrite the docs from the records")
    p.add_argument("--allow-dirty", action="store_true", help="run from a tree with uncommitted code changes "
                   "(development only: such records are marked)")
    args = p.parse_args(argv)
    concepts = [c for pr in args.protocols for c in PROTOCOLS[pr]]
    unknown = sorted(set(args.concepts or []) - set(concepts))
    if unknown:
        raise SystemExit(f"not a concept of the protocols {args.protocols}: {', '.join(unknown)}.")
    concepts = [c for c in concepts if not args.concepts or c in args.concepts]
    records, work = Path(args.records), Path(args.work)
    units = shard([(seed, c) for seed in args.seeds for c in concepts], args.shard)
    if not args.report_only:
        require_clean_tree(args.allow_dirty)
        fields = {"model": args.model, "hardware": hardware(args.device), "protocol_images": args.n_images}
        started, made = time.time(), 0
        for seed, concept in units:
            for name in [m for m in args.methods if not record_path(m, concept, seed, records).exists()]:
                # the evaluator loads its models when first used, after the training process has
                # exited, and they are freed before the next run trains
                ev = Evaluator(args.model, args.device, args.n_images, records, work, args.clip, args.classifier,
                               shlex.split(args.method_args), fields)
                made += run_method(name, concept, seed, ev) is not None
                del ev
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        print(f"{made} runs made in {(time.time() - started) / 60:.1f} min on {fields['hardware']}")
        if args.shard:  # shards merge records by git; the docs are written once, after
            print("records written; after the merge: python benchmarks/compare_sd.py --report-only")
            return
    docs = ROOT / args.docs if not Path(args.docs).is_absolute() else Path(args.docs)
    base = [json.loads(p.read_text()) for p in sorted((records / "base").glob("*.json"))]
    write_docs(load_records(records), base, docs, args.seeds)
    print(f"wrote {docs / 'results.md'}, {docs / 'claims.md'}")


if __name__ == "__main__":
    main()
