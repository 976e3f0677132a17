"""The toy benchmark: every method and the baselines x the 6 shapes and 4 textures x the
development seeds 0-2 (where every default was chosen) and the held-out test seeds 3-5 (the
headline: nothing was tuned on them; the defaults were frozen at commit 80b45b9), each with its
default toy settings, reported with 95% intervals over concepts and each paper's claims checked.

    python benchmarks/compare_toy.py --seeds 3 4 5        # the held-out seeds: what is missing, then the docs
    python benchmarks/compare_toy.py                      # the development seeds 0-2
    python benchmarks/compare_toy.py --report-only        # rewrite the docs from the records alone
    python benchmarks/compare_toy.py --methods pure esd --concepts circle --seeds 0   # a slice

How a comparison is kept fair and resumable:
- for a (concept, seed), every method is evaluated on the same prompts and evaluation seeds
  (eval.eval_set), and the base model's evaluation is computed once and reused by every method;
- a method runs as its own command line (`python <script> --model toy --concept C --seed S
  --n-eval-images 0`: train and save only), then its saved UNet is evaluated here, which gives the
  same figures the method's own report would (same weights, prompts and seeds);
- every run leaves a small record, benchmarks/records/<method>/<concept>-seed<S>.json (every
  metric, the run's arguments, wall time, the commit), and each base evaluation one in
  benchmarks/records/base/. Records are committed: a run whose record exists is never redone, so
  the benchmark resumes on any machine, and `--report-only` rebuilds docs/results/results.md,
  claims.md and tradeoff.png from the records without training.

    python benchmarks/compare_toy.py --attack --seeds 0   # the embedding attack on the saved runs

On several machines, each takes a deterministic slice of the (seed, concept) units with
--shard K/N (a unit's base evaluation and all its methods stay on one machine) and commits its
records; the merge is a git merge of benchmarks/records/. With a SLURM job array, for example:

    sbatch --array=1-8 --wrap 'python benchmarks/compare_toy.py --seeds 3 4 5 --shard $SLURM_ARRAY_TASK_ID/8'

A run refuses to start from a tree whose tracked code differs from its commit (--allow-dirty
allows it for development; such records carry "+changes" in their commit and never enter the
headline). Each record names the exact command, the sha256 of the UNet it measured and the
KID-CLIP estimator it used.

The attack (attack.py, same budget for every method) runs on the saved UNets in outputs/benchmark/
and leaves records in benchmarks/records/attack/<method>/; its control, the same attack on the
base model, is learned once per (concept, seed) and recorded in benchmarks/records/attack/base/;
where the control recovers less than 80% of the concept, no method's ASR on that unit is counted.

Intervals: each concept's seeds averaged first (they are not independent units), then a
t-interval over the concepts (mean +- t_{0.975, n-1} sd / sqrt(n)), the same everywhere; a claim's
interval is that of the paired differences over the concepts both methods share, and its verdict
is Holm-corrected over the claims table.
"""

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import attack  # noqa: E402
import common  # noqa: E402
import eval as evaluation  # noqa: E402
from toy import world  # noqa: E402

# The methods and baselines, their scripts, labels and bars: evaluation.METHODS (the protocol, in
# eval.py). Variants that only a claim needs: name -> (method, extra arguments)
VARIANTS = {"pure_100_steps": ("pure", ["--steps", "100"]),
            # CGRU: its paper's ablation (a terminal reward, no critic), two ablations of our critic
            # (its input; a time-blind critic, without FiLM), and its off-policy reuse
            "rl_critic_terminal": ("rl_critic", ["--advantages", "terminal"]),
            "rl_critic_x0_hat": ("rl_critic", ["--critic-input", "x0_hat"]),
            "rl_critic_time_blind": ("rl_critic", ["--no-timestep"]),
            "rl_critic_reuse_2": ("rl_critic", ["--reuse-iterations", "2"]),
            # VDU's own recipe (precision from checkpoints: the reference and the toy's snapshots),
            # with all three snapshots and with two; at gamma 0.5, the toy default when they first ran
            "vdu_3_snapshots": ("vdu", ["--gamma", "0.5", "--precision-from", "checkpoints"]),
            "vdu_2_snapshots": ("vdu", ["--gamma", "0.5", "--precision-from", "checkpoints", "--checkpoints",
                                        "toy/snapshots/unet-1", "toy/snapshots/unet-2"]),
            # LoRA adapters instead of full weights (each method's toy LoRA learning rate; SalUn and
            # VDU refuse LoRA), measured on the development seeds beside the full-weight runs
            **{f"{m}_lora": (m, ["--train", "lora"]) for m in ("pure", "mim_mu", "rl_critic", "esd", "fmn")}}
CONCEPTS = world.SHAPES + world.TEXTURES
SEEDS = [0, 1, 2]       # the development seeds: every default was chosen on these
TEST_SEEDS = [3, 4, 5]  # held out: nothing was tuned on them; the headline
N_IMAGES = 64
RECORDS = ROOT / "benchmarks" / "records"
MULTI_RECORDS = RECORDS / "multi"  # benchmarks/compare_multi.py's: several concepts and sequences
ATTACKS = RECORDS / "attack"
WORK = ROOT / "outputs" / "benchmark"
# Records made since eval.kernel_distance leaves the paired images out of its cross term say so;
# older ones (the development seeds 0-2) counted those pairs, which biases KID-CLIP below 0 for
# methods that change each image little (by about 0.11 for an unchanged model on the toy).
KID_ESTIMATOR = "u-statistic"

# ---------------------------------------------------------------------------------------------
# Running: base evaluations and method runs, each leaving a record
# ---------------------------------------------------------------------------------------------


def file_name(concept: str) -> str:
    """A concept as it appears in file names: "Van Gogh" -> "van-gogh" (a toy concept is unchanged)."""
    return concept.lower().replace(" ", "-")


def record_path(name: str, concept: str, seed: int, root: Path = RECORDS) -> Path:
    return root / name / f"{file_name(concept)}-seed{seed}.json"


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
        # "+changes": tracked code differs from the commit (the docs and records this script itself
        # rewrites do not count, so a run made between two benchmark invocations is not flagged)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=normal", "--", ".", ":!docs",
                                ":!benchmarks/records"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head + ("+changes" if dirty else "") if head else "unknown"
    except OSError:
        return "unknown"


def require_clean_tree(allow_dirty: bool) -> None:
    """A record names the commit that made it, so a run from a tree whose tracked code differs
    from that commit cannot be traced: refuse it, unless --allow-dirty (development only; such a
    record's commit ends in "+changes" and never enters the headline)."""
    if commit().endswith("+changes") and not allow_dirty:
        raise SystemExit("tracked code differs from the last commit: commit it first (records name the commit "
                         "that made them), or pass --allow-dirty for a development run that never enters the headline.")


UNET_FILE = "diffusion_pytorch_model.safetensors"  # where diffusers saves a UNet's weights


def result_file(run: Path) -> Path:
    """A saved run's weights file: its UNet's, or a LoRA run's adapters."""
    unet = Path(run) / "unet" / UNET_FILE
    return unet if unet.exists() else Path(run) / common.LORA_FILE


def unet_sha256(run: Path) -> str:
    """The sha256 of a saved run's weights file (result_file): which weights a record measured or attacked."""
    import hashlib
    h = hashlib.sha256()
    with open(result_file(run), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard(units: list, spec: str | None) -> list:
    """--shard K/N: the K-th of N deterministic slices of a run list (every N-th unit from K-1), so
    N machines fill the same record tree without overlap; None: every unit."""
    if not spec:
        return units
    k, n = map(int, spec.split("/"))
    if not 1 <= k <= n:
        raise SystemExit(f"--shard wants K/N with 1 <= K <= N, got {spec}.")
    return units[k - 1::n]


def write_json(path: Path, data: dict) -> None:
    """Written whole or not at all (a temporary file renamed), so an interruption leaves no half record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.rename(path)


class Evaluator:
    """A model, its judge and CLIP loaded once; base evaluations cached per (concept, seed). The
    toy by default; the Stable Diffusion benchmark (compare_sd.py) passes its model, judges, image
    count and folders, `method_args` (appended to every method's command line) and `fields` (added
    to every record: the model, the hardware)."""

    def __init__(self, model: str = "toy", device: str = "cpu", n_images: int = N_IMAGES, records: Path = RECORDS,
                 work: Path = WORK, clip: str | None = None, classifier: str | None = None,
                 method_args: tuple = (), fields: dict | None = None):
        self.model, self.n_images, self.records, self.work = model, n_images, records, work
        self.method_args, self.fields = list(method_args), fields or {}
        self._load_args, self._loaded, self._base = (model, device, clip, classifier), None, {}

    def _load(self) -> tuple:
        """The model, CLIP and judge, loaded on first use (after the first run has trained)."""
        if self._loaded is None:
            model, device, clip, classifier = self._load_args
            models = common.load_models(model, torch.device(device))
            clip = evaluation.load_clip(models, clip)
            self._loaded = models, clip, evaluation.Judge(models, clip, classifier)
        return self._loaded

    models = property(lambda self: self._load()[0])
    clip = property(lambda self: self._load()[1])
    judge = property(lambda self: self._load()[2])

    def record_path(self, name: str, concept: str, seed: int) -> Path:
        return record_path(name, concept, seed, self.records)

    def eval_set(self, concept: str, seed: int):
        ps = common.concept_prompts(concept, self.models)
        return ps, evaluation.eval_set(ps, self.n_images, seed)

    def base(self, concept: str, seed: int) -> tuple[dict, torch.Tensor]:
        """The base model's metrics (record) and retain-image CLIP features (cached in outputs/)."""
        if (concept, seed) in self._base:
            return self._base[(concept, seed)]
        path = self.record_path("base", concept, seed)
        feats_path = self.work / f"base-{file_name(concept)}-seed{seed}.safetensors"
        if path.exists() and feats_path.exists():
            out = json.loads(path.read_text())["metrics"], load_file(feats_path)["features"]
        else:
            ps, es = self.eval_set(concept, seed)
            t0 = time.time()
            m, _, feats = evaluation.evaluate(self.models, self.models.unet, es, self.judge, self.clip, ps.concept)
            # the noise floor of the image-quality figures: the base model against itself, on the
            # same retain prompts with other seeds (a perfect method would score this)
            groups = [g for g in ("retain_in", "retain_cross") if g in es.groups]
            prompts = [p for g in groups for p in es.groups[g]]
            floor = evaluation.eval_set(ps, self.n_images, seed, "noise_floor")  # the same prompts, other seeds
            seeds = [s for g in groups for s in floor.seeds[g]]
            again = self.clip.image_features(common.sample(self.models, prompts, seeds).images)
            m["fd_clip_floor"] = evaluation.frechet_distance(again, feats)
            m["kid_clip_floor"] = evaluation.kernel_distance(again, feats)
            feats_path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"features": feats.contiguous()}, feats_path)
            if not path.exists():  # a recomputed base (new machine) leaves the committed record alone
                write_json(path, {"concept": concept, "seed": seed, "n_images": self.n_images, "commit": commit(),
                                  "kid_estimator": KID_ESTIMATOR, **self.fields,
                                  "eval_time_s": round(time.time() - t0, 1), "metrics": m})
            out = m, feats
        self._base[(concept, seed)] = out
        return out

    def unlearned(self, run: Path, concept: str, seed: int) -> tuple[dict, float]:
        ps, es = self.eval_set(concept, seed)
        _, base_feats = self.base(concept, seed)
        t0 = time.time()
        unet = common.load_run_unet(run, self.models.device)
        m, _, feats = evaluation.evaluate(self.models, unet, es, self.judge, self.clip, ps.concept)
        m["fd_clip"] = evaluation.frechet_distance(feats, base_feats)
        m["kid_clip"] = evaluation.kernel_distance(feats, base_feats)
        return m, time.time() - t0


def run_method(name: str, concept: str, seed: int, ev: Evaluator) -> dict | None:
    """Train one method (or variant) on one (concept, seed), evaluate it, write its record."""
    method, extra = VARIANTS.get(name, (name, []))
    extra = [*extra, *ev.method_args]
    script = evaluation.METHODS[method]["script"]
    stem = f"{name}-{file_name(concept)}-seed{seed}"
    out, log = ev.work / stem, ev.work / f"{stem}.log"
    cmd = [sys.executable, script, "--model", ev.model, "--concept", concept, "--seed", str(seed),
           "--n-eval-images", "0", "--output-dir", str(out), "--overwrite", *extra]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        print(f"  {name} {concept} seed {seed}: FAILED, see {log}")
        return None
    run = json.loads((out / "run.json").read_text())
    base, _ = ev.base(concept, seed)
    m, eval_time = ev.unlearned(out, concept, seed)
    where = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    rec = {"method": name, "concept": concept, "seed": seed, "commit": commit(), "n_images": ev.n_images,
           "command": shlex.join(["python", script, "--model", ev.model, "--concept", concept, "--seed", str(seed), *extra]),
           # what exactly ran (the output folder relative to the repository) and which weights were evaluated
           "argv": [str(where) if c == str(out) else c for c in cmd[1:]], **ev.fields,
           "unet_sha256": unet_sha256(out), "result_mb": round(result_file(out).stat().st_size / 2 ** 20, 3),
           "kid_estimator": KID_ESTIMATOR, "args": run["args"], "train_time_s": run["wall_time_s"], "eval_time_s": round(eval_time, 1),
           # what one standalone run takes, less its base evaluation (the benchmark shares that)
           "wall_time_s": round(run["wall_time_s"] + eval_time, 1),
           "base": base, "unlearned": m}
    write_json(ev.record_path(name, concept, seed), rec)
    print(f"  {name} {concept} seed {seed}: UA {m['ua']:.0%}, retain in {m['retain_in']:.0%} (base "
          f"{base['retain_in']:.0%}), worst {m['retain_in_worst_value']} {m['retain_in_worst']:.0%}, "
          f"{rec['wall_time_s']:.0f}s", flush=True)
    return rec


class Attacker:
    """attack.py's attack with its toy budget, on its own copy of the toy model (the attack adds a
    token to the tokenizer); its control on the base model learned once per (concept, seed)."""

    def __init__(self):
        self.models = common.load_models("toy", torch.device("cpu"))
        self.models.unet.eval().requires_grad_(False)
        self.judge = evaluation.Judge(self.models)
        self.args = attack.Args(run="", **attack.TOY_DEFAULTS)
        self._cache = {}

    def _data(self, concept: str, seed: int):
        """The prompt set, D_f and the judged seeds of a (concept, seed), drawn once for every method."""
        self.args.seed = seed
        if (concept, seed) not in self._cache:
            ps = common.concept_prompts(concept, self.models)
            self._cache = {(concept, seed): (ps, attack.make_data(self.args, self.models, ps),
                                             attack.eval_seeds(seed, self.args.n_eval_images))}
        return self._cache[(concept, seed)]

    def one(self, name: str, concept: str, seed: int) -> dict | None:
        """The attack on one saved run (or, name "base", on the base model), recorded."""
        path = ATTACKS / name / f"{concept}-seed{seed}.json"
        run = WORK / f"{name}-{concept}-seed{seed}"
        if path.exists() or (name != "base" and not result_file(run).exists()):
            return None
        t0 = time.time()
        ps, x0, seeds = self._data(concept, seed)
        unet = self.models.unet if name == "base" else common.load_run_unet(run).requires_grad_(False)
        out = attack.attack(self.args, self.models, unet, self.judge, ps, x0, seeds, f"attack {name} {concept}")
        budget = {k: getattr(self.args, k) for k in ("steps", "lr", "batch_size", "n_images", "init_word", "seed")}
        rec = {"method": name, "concept": concept, "seed": seed, "commit": commit(),
               "unet_sha256": unet_sha256(run) if name != "base" else "the base toy UNet",
               "command": f"python attack.py --run {run.relative_to(ROOT)}" if name != "base" else
               "attack.attack on the base toy UNet (the control of python attack.py)",
               "asr": out["asr"], "n_eval_images": len(seeds), "eval_seeds": [seeds[0], seeds[-1]],
               "budget": {**budget, "prompt": attack.template(self.models, ps)}, "final_loss": out["final_loss"],
               "nearest_words": out["nearest_words"], "wall_time_s": round(time.time() - t0, 1)}
        write_json(path, rec)
        print(f"  attack {name} {concept} seed {seed}: ASR {out['asr']:.0%} ({rec['wall_time_s']:.0f}s), "
              f"nearest words {', '.join(w for w, _ in out['nearest_words'][:3])}", flush=True)
        return rec


# ---------------------------------------------------------------------------------------------
# Statistics: the concept is the unit
# ---------------------------------------------------------------------------------------------
# The seeds of one concept are not independent units: their paired differences between methods
# correlate strongly (intraclass correlation 0.64-0.94 on most claims), so a t-interval over all
# (concept, seed) runs is too narrow. Every interval here averages the seeds of each concept first
# and takes the t-interval over the concepts (n = concepts, df = n - 1). Claim verdicts add a Holm
# correction over the claims table (family-wise 5%).

ALPHA = 0.05


def interval(values: list[float], level: float = 1 - ALPHA) -> tuple[float, float, float]:
    """(mean, low, high): the t-interval of the mean at `level`, the values taken as independent."""
    from scipy import stats
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def concept_means(units: dict) -> list[float]:
    """{(concept, seed): value} -> each concept's mean over its seeds (missing values left out)."""
    by_concept = {}
    for (concept, _), v in sorted(units.items()):
        if v is not None and not math.isnan(v):
            by_concept.setdefault(concept, []).append(v)
    return [float(np.mean(v)) for v in by_concept.values()]


def concept_interval(units: dict, level: float = 1 - ALPHA) -> tuple[float, float, float]:
    """The interval over concepts, seeds nested: the t-interval of the per-concept means."""
    return interval(concept_means(units), level)


def p_value(values: list[float]) -> float:
    """Two-sided one-sample t-test of mean 0 (values without spread: 1 if all 0, else 0)."""
    from scipy import stats
    if len(values) < 2:
        return float("nan")
    if np.std(values) == 0:  # scipy gives NaN here, which would stop Holm's step-down
        return 1.0 if values[0] == 0 else 0.0
    return float(stats.ttest_1samp(values, 0.0).pvalue)


# the figures of a run, in the units the tables print; "drop" = base - unlearned
def figures(rec: dict) -> dict:
    u, b = rec["unlearned"], rec["base"]
    return {
        "ua": 100 * u["ua"], "ua_synonym": 100 * u["ua_synonym"], "retain_in": 100 * u["retain_in"],
        "retain_in_drop": 100 * (b["retain_in"] - u["retain_in"]),
        "worst_drop": 100 * evaluation.worst_drop(rec)[1],  # the neighbour damaged most
        "retain_cross_drop": 100 * (b["retain_cross"] - u["retain_cross"]),
        # forget fidelity reads the toy's attributes: a Stable Diffusion record has none
        "forget_fidelity": 100 * u.get("forget_fidelity", math.nan),
        "forget_degenerate": 100 * u.get("forget_degenerate", math.nan),
        "fd_clip": u["fd_clip"], "kid_clip": u["kid_clip"],
        "clip_forget": u["clip_forget"], "clip_retain": u["clip_retain"], "wall_time_s": rec["wall_time_s"],
        # the embedding attack's success on this run's UNet, where it was attacked (load_records)
        "asr": 100 * rec["attack"]["asr"] if "attack" in rec else float("nan"),
        "meets_bar": float(evaluation.meets_bar(METHODS_BAR.get(rec["method"], rec["method"]), rec)),
        "meets_common_bar": float(evaluation.meets_common_bar(rec)),
    }


METHODS_BAR = {v: m for v, (m, _) in VARIANTS.items()}
# the columns of the per-method table (headers: evaluation.COLUMNS) and of the per-concept ones
COLUMNS = ["ua", "ua_synonym", "retain_in_drop", "worst_drop", "retain_cross_drop", "forget_fidelity",
           "forget_degenerate", "kid_clip", "fd_clip", "clip_forget", "clip_retain", "asr", "wall_time_s"]
CONCEPT_COLUMNS = ["ua", "retain_in_drop", "worst_drop", "forget_fidelity", "kid_clip", "asr"]


# The attack says something about a run only where its control, the same attack on the base
# model, brings the concept back: on a (concept, seed) whose control recovers less than this
# share, every method's ASR is left out of the tables (and the unit is named in results.md).
CONTROL_BAR = 0.8


def load_records() -> dict:
    """(name, concept, seed) -> record, for every method, baseline and variant record on disk;
    a run's attack record is attached as rec["attack"] where its control passed CONTROL_BAR."""
    controls, out = load_base_attacks(), {}
    for name in list(evaluation.METHODS) + list(VARIANTS):
        for path in sorted((RECORDS / name).glob("*.json")):
            rec = json.loads(path.read_text())
            hit = ATTACKS / name / path.name
            control = controls.get((rec["concept"], rec["seed"]))
            if hit.exists() and control is not None and control["asr"] >= CONTROL_BAR:
                rec["attack"] = json.loads(hit.read_text())
            out[(name, rec["concept"], rec["seed"])] = rec
    return out


def failed_controls() -> list[dict]:
    """The base-model controls below CONTROL_BAR: their units' ASRs are left out."""
    return [r for r in load_base_attacks().values() if r["asr"] < CONTROL_BAR]


def load_base_attacks() -> dict:
    """(concept, seed) -> the attack's control record on the base model."""
    return {(r["concept"], r["seed"]): r for r in map(lambda p: json.loads(p.read_text()),
                                                       sorted((ATTACKS / "base").glob("*.json")))}


# ---------------------------------------------------------------------------------------------
# Claims: each paper's own, checked on the paired (concept, seed) units
# ---------------------------------------------------------------------------------------------

# (paper, claim, metric, method, against, direction, source[, both forget]): against is another method's
# name or a number; direction +1 = the claim says `method` is higher, -1 = lower. A "comparable" claim is
# checked as "not worse by more than 5 points" (direction +1 against the other method's value - 5).
# source: where the paper's side states it; a summary of a paper is weaker evidence than its abstract
# or a table. both forget (True for the image-quality claims and "2 vs 3 snapshots"): the comparison
# means something only where both sides forgot the concept, so it is made on the units where both
# reach UA >= 90% (a method that forgets nothing keeps perfect image quality), or "not testable".
PURE_ABS = "abstract"
MIM_SUMMARY = "a summary of the paper, not its abstract"
VDU_SUMMARY = "a summary of the paper"
CGRU_ABS = "abstract"
# CGRU's figures: its Table 1 (UnlearnCanvas objects, SD 1.5) as the public reviews quote it. The
# 92.5% / 85.2% tested here before came from an automated summary, not from the paper.
CGRU_TABLE = "Table 1 (UnlearnCanvas objects, SD 1.5), as quoted in the public reviews"
CLAIMS = [
    ("PURE", "outperforms ESD in forgetting (UA)", "ua", "pure", "esd", +1, PURE_ABS),
    ("PURE", "outperforms SalUn in forgetting (UA)", "ua", "pure", "salun", +1, PURE_ABS),
    ("PURE", "keeps more than ESD (in-domain retain drop)", "retain_in_drop", "pure", "esd", -1, PURE_ABS),
    ("PURE", "keeps more than SalUn (in-domain retain drop)", "retain_in_drop", "pure", "salun", -1, PURE_ABS),
    ("PURE", "better fidelity than ESD (KID-CLIP)", "kid_clip", "pure", "esd", -1, PURE_ABS, True),
    ("PURE", "better fidelity than SalUn (KID-CLIP)", "kid_clip", "pure", "salun", -1, PURE_ABS, True),
    ("PURE", "outperforms FMN in forgetting (UA)", "ua", "pure", "fmn", +1, PURE_ABS),
    ("PURE", "keeps more than FMN (in-domain retain drop)", "retain_in_drop", "pure", "fmn", -1, PURE_ABS),
    ("PURE", "better fidelity than FMN (KID-CLIP)", "kid_clip", "pure", "fmn", -1, PURE_ABS, True),
    ("PURE", "almost perfect unlearning in 100 steps (UA above 95%)", "ua", "pure_100_steps", 95.0, +1,
     PURE_ABS),
    ("MiM-MU", "outperforms SalUn in UA (on fine-grained sets)", "ua", "mim_mu", "salun", +1,
     MIM_SUMMARY),
    ("MiM-MU", "outperforms SalUn in retain (on fine-grained sets; in-domain retain drop)",
     "retain_in_drop", "mim_mu", "salun", -1, MIM_SUMMARY),
    ("MiM-MU", "its limitation: an entangled neighbour degrades (the worst-hit neighbour drops by more than "
     "10 points)", "worst_drop", "mim_mu", 10.0, +1, MIM_SUMMARY),
    ("VDU", "better image quality than ESD (KID-CLIP)", "kid_clip", "vdu", "esd", -1, VDU_SUMMARY, True),
    ("VDU", "better image quality than SalUn (KID-CLIP)", "kid_clip", "vdu", "salun", -1, VDU_SUMMARY, True),
    ("VDU", "better image quality than ESD (CLIP retain)", "clip_retain", "vdu", "esd", +1, VDU_SUMMARY, True),
    ("VDU", "better image quality than SalUn (CLIP retain)", "clip_retain", "vdu", "salun", +1, VDU_SUMMARY,
     True),
    ("CGRU", "forgetting better than or comparable to ESD (UA, within 5 points)", "ua_comparable", "rl_critic",
     "esd", +1, CGRU_ABS),
    ("CGRU", "forgetting better than or comparable to SalUn (UA, within 5 points)", "ua_comparable",
     "rl_critic", "salun", +1, CGRU_ABS),
    ("CGRU", "keeps image quality: KID-CLIP no worse than ESD's", "kid_clip", "rl_critic", "esd", -1, CGRU_ABS,
     True),
    ("CGRU", "keeps image quality: KID-CLIP no worse than SalUn's", "kid_clip", "rl_critic", "salun", -1,
     CGRU_ABS, True),
    # benign prompts are the retain prompts (forget-prompt fidelity stays our own column)
    ("CGRU", "keeps benign-prompt fidelity better than ESD (CLIP score of the retain prompts)", "clip_retain",
     "rl_critic", "esd", +1, CGRU_ABS, True),
    ("CGRU", "keeps benign-prompt fidelity better than SalUn (CLIP score of the retain prompts)", "clip_retain",
     "rl_critic", "salun", +1, CGRU_ABS, True),
    ("CGRU", "its figures: UA 95.55%", "ua", "rl_critic", 95.55, +1, CGRU_TABLE),
    ("CGRU", "its figures: in-domain retain 78.47%", "retain_in", "rl_critic", 78.47, +1, CGRU_TABLE),
    ("CGRU", "ablation: a per-step critic forgets more than a terminal reward alone (UA)", "ua", "rl_critic",
     "rl_critic_terminal", +1, "abstract (sparse end-of-trajectory rewards give high-variance updates)"),
    ("CGRU", "ablation: a per-step critic keeps more than a terminal reward alone (in-domain retain drop)",
     "retain_in_drop", "rl_critic", "rl_critic_terminal", -1, "our reading of the abstract"),
    ("CGRU", "ablation: a per-step critic is steadier than a terminal reward alone (the standard deviation "
     "of UA over a concept's seeds)", "ua_spread", "rl_critic", "rl_critic_terminal", -1,
     "abstract (sparse end-of-trajectory rewards give high-variance updates)"),
    ("CGRU", "ablation: the critic needs the noisy state (UA above an x0_hat critic's)", "ua", "rl_critic",
     "rl_critic_x0_hat", +1, "abstract (its ablation: rewards on noisy states are key)"),
    ("CGRU", "our ablation: the critic needs the timestep (UA above a time-blind critic, no FiLM)", "ua", "rl_critic",
     "rl_critic_time_blind", +1, "our reading: the abstract names a timestep-aware critic"),
    ("CGRU", "off-policy reuse helps (UA with 2 replayed iterations above on-policy)", "ua", "rl_critic_reuse_2",
     "rl_critic", +1, "our reading: the paper reuses old trajectories off-policy"),
    ("VDU", "robust with few checkpoints: 2 snapshots forget comparably to 3 (UA, within 5 points)",
     "ua_comparable", "vdu_2_snapshots", "vdu_3_snapshots", +1, VDU_SUMMARY, True),
]


# Ours, not a paper's (their own family, apart from the papers' claims): LoRA adapters forget and keep
# comparably to full weights, each within 5 points, on the development seeds where both were run.
LORA_CLAIMS = [c for m in ("pure", "mim_mu", "rl_critic", "esd", "fmn") for c in (
    ("LoRA", f"{evaluation.METHODS[m]['label']}: LoRA forgets comparably to full weights (UA within 5 points)",
     "ua_comparable", f"{m}_lora", m, +1, "ours"),
    ("LoRA", f"{evaluation.METHODS[m]['label']}: LoRA keeps comparably to full weights (in-domain drop within 5 "
     "points)", "retain_in_drop_comparable", f"{m}_lora", m, -1, "ours"))]


def claim_value(rec: dict, metric: str) -> float:
    return figures(rec)[metric.removesuffix("_comparable")]


MIN_FORGOTTEN_CONCEPTS = 3  # a "both forget" claim with fewer such concepts is not testable


def check_claim(records: dict, claim, level: float = 1 - ALPHA) -> dict:
    """One claim on the paired (concept, seed) units: the per-unit differences (first method minus
    the other, or minus the stated figure), averaged over each concept's seeds, then a t-interval
    and a two-sided p-value over the concepts. The verdict here is unadjusted (holm() adds the
    family-wise one)."""
    paper, text, metric, method, against, direction = claim[:6]
    source = claim[6] if len(claim) > 6 else ""
    both_forget = claim[7] if len(claim) > 7 else False
    units = sorted({(c, s) for (n, c, s) in records if n == method})
    sides = [method] + ([against] if isinstance(against, str) else [])
    units = [u for u in units if all((n, *u) in records for n in sides)]
    if metric == "kid_clip":  # pair KID-CLIP only between records of the same estimator
        units = [u for u in units if len({records[(n, *u)].get("kid_estimator") for n in sides}) == 1]

    def diffs(units):
        out = {}
        for u in units:
            other = claim_value(records[(against, *u)], metric) if isinstance(against, str) else against
            # "comparable": within 5 points on the claimed side (UA above the other's - 5, a drop below its + 5)
            margin = 5.0 * direction if metric.endswith("_comparable") else 0.0
            out[u] = claim_value(records[(method, *u)], metric) - other + margin
        return out
    n_concepts = len({c for c, _ in units})
    if metric.endswith("_spread"):  # per concept: the spread of its seeds' values, one side's minus the other's
        def spread(name, concept):
            return float(np.std([claim_value(records[(name, *u)], metric.removesuffix("_spread"))
                                 for u in units if u[0] == concept], ddof=1))
        means = [spread(method, c) - spread(against, c) for c in sorted({c for c, _ in units})
                 if sum(u[0] == c for u in units) >= 2]
        return finish(paper, text, metric, against, source, direction, means, units, level, n_concepts)
    every = diffs(units)
    if both_forget:
        units = [u for u in units if all(records[(n, *u)]["unlearned"]["ua"] >= evaluation.BAR_UA for n in sides)]
    means = concept_means(diffs(units))
    return finish(paper, text, metric, against, source, direction, means, units, level, n_concepts, both_forget,
                  concept_interval(every) if both_forget else None)


def finish(paper, text, metric, against, source, direction, means: list[float], units: list, level: float,
           n_concepts: int, both_forget: bool = False, unmatched=None) -> dict:
    """A claim's interval, p-value and unadjusted verdict from its per-concept differences `means`."""
    mean, low, high = interval(means, level)
    if n_concepts < 2:
        verdict = "not measured yet"
    elif both_forget and len(means) < MIN_FORGOTTEN_CONCEPTS:
        verdict = f"not testable ({len(means)} concepts where both forget)"
    elif direction * low > 0 and direction * high > 0:
        verdict = "holds"
    elif direction * low < 0 and direction * high < 0:
        verdict = "fails"
    else:
        verdict = "inconclusive"
    return {"paper": paper, "claim": text, "n": len(means), "n_units": len(units), "mean": mean, "low": low,
            "high": high, "p": p_value(means), "verdict": verdict, "against": against, "metric": metric,
            "source": source, "direction": direction, "means": means, "both_forget": both_forget,
            # a quality claim over every paired unit, forgotten or not: shown beside, never a verdict
            "unmatched": unmatched}


def holm(results: list[dict], alpha: float = ALPHA) -> list[dict]:
    """Holm's step-down correction over the claims that have a verdict: sorted by p-value, the i-th
    (from 0) of m is tested at alpha / (m - i) until the first that is not rejected. Each gets
    "holm_verdict" and the interval at its own step's level ("holm_low", "holm_high"): holds or
    fails when that interval excludes 0 and every claim before it did, else inconclusive."""
    family = sorted((r for r in results if r["verdict"] in ("holds", "fails", "inconclusive")),
                    key=lambda r: (math.isnan(r["p"]), r["p"]))
    rejecting = True
    for i, r in enumerate(family):
        level = 1 - alpha / (len(family) - i)
        _, r["holm_low"], r["holm_high"] = interval(r["means"], level)
        rejecting = rejecting and r["p"] <= alpha / (len(family) - i)
        r["holm_verdict"] = ("holds" if r["direction"] * r["mean"] > 0 else "fails") if rejecting else "inconclusive"
    for r in results:
        r.setdefault("holm_verdict", r["verdict"])
    return results


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------

def fmt(v: float, digits: int = 1) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.{digits}f}"


def fmt_interval(units: dict, digits: int = 1) -> str:
    """{(concept, seed): value} -> "mean [low, high]", the interval over concepts (seeds nested)."""
    mean, low, high = concept_interval(units)
    if math.isnan(low):
        return fmt(mean, digits)
    return f"{fmt(mean, digits)} [{fmt(low, digits)}, {fmt(high, digits)}]"


def units_of(records: dict, name: str, key: str) -> dict:
    """{(concept, seed): figure} of one method's runs."""
    return {(c, s): figures(r)[key] for (n, c, s), r in records.items() if n == name}


def method_table(records: dict, names: list[str], columns: list[str] = COLUMNS) -> str:
    rows = []
    for name in names:
        recs = [r for (n, _, _), r in records.items() if n == name]
        if not recs:
            continue
        cells = [fmt_interval(units_of(records, name, k), 2 if k == "kid_clip" else 1) for k in columns]
        meets = int(sum(evaluation.meets_common_bar(r) for r in recs))
        n_concepts = len({r["concept"] for r in recs})
        rows.append([label(name), f"{len(recs)} ({n_concepts})", *cells, f"{meets}/{len(recs)}"])
    header = ["method", "runs (concepts)", *map(evaluation.heading, columns), "runs meeting the common bar"]
    return evaluation.markdown_table(header, rows)


def kind_table(records: dict, names: list[str]) -> str:
    """Shapes and textures apart: UA and in-domain drop over each kind's concepts."""
    rows = []
    for name in names:
        cells = []
        for kind in (world.SHAPES, world.TEXTURES):
            for key in ("ua", "retain_in_drop", "retain_cross_drop"):
                cells.append(fmt_interval({u: v for u, v in units_of(records, name, key).items() if u[0] in kind}))
        if any(c != "-" for c in cells):
            rows.append([label(name), *cells])
    header = ["method"] + [f"{kind}: {evaluation.heading(k, short=True)}" for kind in ("shapes", "textures")
                           for k in ("ua", "retain_in_drop", "retain_cross_drop")]
    return evaluation.markdown_table(header, rows)


def optimism_table(dev: dict, test: dict, names: list[str]) -> str:
    """Development minus test per method: how much choosing the defaults on seeds 0-2 flatters them.
    Paired by concept (each concept's dev mean minus its test mean), interval over the concepts."""
    rows = []
    for name in names:
        cells = []
        for key in ("ua", "retain_in_drop", "worst_drop"):
            d, t = units_of(dev, name, key), units_of(test, name, key)
            dm = {c: np.mean([v for (cc, _), v in d.items() if cc == c]) for c, _ in d}
            tm = {c: np.mean([v for (cc, _), v in t.items() if cc == c]) for c, _ in t}
            common_c = sorted(set(dm) & set(tm))
            cells.append(fmt_interval({(c, 0): float(dm[c] - tm[c]) for c in common_c}))
        if any(c != "-" for c in cells):
            rows.append([label(name), *cells])
    header = ["method", "UA: dev - test (pts)", "in-domain drop: dev - test", "worst-value drop: dev - test"]
    return evaluation.markdown_table(header, rows)


def label(name: str) -> str:
    if name in VARIANTS:
        method, extra = VARIANTS[name]
        return f"{evaluation.METHODS[method]['label']} `{' '.join(extra)}`"
    return evaluation.METHODS[name]["label"]


def concept_table(records: dict, name: str) -> str:
    rows = []
    for concept in CONCEPTS:
        recs = [r for (n, c, _), r in sorted(records.items()) if n == name and c == concept]
        if not recs:
            continue
        figs = [figures(r) for r in recs]
        cells = []
        for k in CONCEPT_COLUMNS:
            v = [f[k] for f in figs if not math.isnan(f[k])]
            if not v:
                cells.append("-")
                continue
            d = 2 if k == "kid_clip" else 0
            cells.append(fmt(float(np.mean(v)), d) + (f" ({fmt(min(v), d)} to {fmt(max(v), d)})" if len(v) > 1 else ""))
        worst = ", ".join(evaluation.worst_drop(r)[0] for r in recs)
        meets = int(sum(f["meets_bar"] for f in figs))
        rows.append([concept, str(len(recs)), *cells, worst, f"{meets}/{len(recs)}"])
    header = ["concept", "seeds", *(evaluation.heading(k, short=True) for k in CONCEPT_COLUMNS),
              "worst-hit values", "seeds meeting its own bar"]
    return evaluation.markdown_table(header, rows)


def quality_scatter(records: dict) -> list[str]:
    """Which image-quality figure is stable at 64 images per group: for each (method, concept) with
    3 seeds, the seed-to-seed standard deviation relative to the spread between methods."""
    rows = []
    for key in ("kid_clip", "fd_clip"):
        within, means = [], []
        for m in evaluation.METHODS:
            for c in CONCEPTS:
                v = [figures(r)[key] for (n, cc, _), r in records.items() if n == m and cc == c]
                if len(v) == 3:
                    within.append(np.std(v, ddof=1))
                    means.append(np.mean(v))
        if len(means) > 1:
            ratio = float(np.mean(within) / np.std(means, ddof=1))
            rows.append([evaluation.heading(key), str(len(means)), f"{np.mean(within):.2f}",
                         f"{np.std(means, ddof=1):.2f}", f"{ratio:.2f}"])
    if not rows:
        return []
    return [evaluation.markdown_table(["figure", "(method, concept) pairs with 3 seeds", "mean seed-to-seed sd",
                                       "sd across pairs of the 3-seed means", "ratio (lower: more stable)"], rows)]


def tradeoff_figure(records: dict, path: Path, names: list[str] | None = None, name_label=None,
                    zoom: tuple | None = (80.0, 100.0, -5.0, 25.0)) -> None:
    """In-domain retain drop (y) against UA (x): faint dots for single runs, one marker per method
    (or the given names, e.g. search candidates) at its mean with 95% intervals over concepts as
    error bars; on the right, the same at a larger scale where most methods crowd (`zoom`: UA and
    drop ranges; None for none). Drawn with PIL (no plotting dependency) so that it is
    byte-identical on every machine."""
    names, name_label = list(evaluation.METHODS) if names is None else names, name_label or label
    from PIL import Image, ImageDraw
    main_w, zoom_w, h, legend = 560, 340 if zoom else 0, 520, 200
    w = main_w + legend + zoom_w
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    y0, y1 = -10.0, 60.0  # drop in points
    drops = [figures(r)["retain_in_drop"] for r in records.values()]
    if drops:
        y1 = max(y1, 10 * math.ceil(max(drops) / 10))
        y0 = min(y0, 10 * math.floor(min(drops) / 10))
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (110, 110, 110), (148, 103, 189),
               (140, 86, 75), (227, 119, 194)]
    shown = [(i, n) for i, n in enumerate(names) if any(k[0] == n for k in records)]

    def panel(box, x0, x1, y0, y1, step_x, step_y, dots):
        left, top, right, bottom = box

        def px(x, y):  # data -> pixels, clipped to the panel (an interval of 2 runs is wide)
            x, y = min(max(x, x0), x1), min(max(y, y0), y1)
            return left + (x - x0) / (x1 - x0) * (right - left), top + (y - y0) / (y1 - y0) * (bottom - top)
        for x in range(int(x0), int(x1) + 1, step_x):
            a, _ = px(x, y0)
            d.line([(a, top), (a, bottom)], fill=(235, 235, 235))
            d.text((a - 8, bottom + 6), f"{x}", fill="black")
        for y in range(int(y0), int(y1) + 1, step_y):
            _, b = px(x0, y)
            d.line([(left, b), (right, b)], fill=(235, 235, 235) if y else (150, 150, 150))
            d.text((left - 30, b - 6), f"{y}", fill="black")
        bar_x, _ = px(evaluation.BAR_UA * 100, y0)
        d.line([(bar_x, top), (bar_x, bottom)], fill=(150, 150, 150))
        d.text((bar_x + 4, bottom - 14), "UA bar", fill=(120, 120, 120))
        for i, name in shown:
            col = colours[i % len(colours)]
            if dots:
                faint = tuple(int(c + (255 - c) * 0.65) for c in col)
                for f in (figures(r) for (n, _, _), r in records.items() if n == name):
                    x, y = px(f["ua"], f["retain_in_drop"])
                    d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=faint)
            ua, ua_lo, ua_hi = concept_interval(units_of(records, name, "ua"))
            dr, dr_lo, dr_hi = concept_interval(units_of(records, name, "retain_in_drop"))
            if not (x0 <= ua <= x1 and y0 <= dr <= y1):
                continue  # a mean outside the zoom is shown in the main panel only
            x, y = px(ua, dr)
            if not math.isnan(ua_lo):
                d.line([px(ua_lo, dr), px(ua_hi, dr)], fill=col, width=2)
                d.line([px(ua, dr_lo), px(ua, dr_hi)], fill=col, width=2)
            d.rectangle([x - 5, y - 5, x + 5, y + 5], fill=col)

    panel((70, 30, main_w - 10, h - 60), 0.0, 100.0, y0, y1, 10, 10, dots=True)
    d.text((70 + 80, h - 22), "UA (%): share of forget images without the concept ->", fill="black")
    d.text((6, 8), "in-domain retain drop (points, base - unlearned): up is better", fill="black")
    if zoom:
        zx = main_w + legend
        panel((zx + 40, 30, w - 15, h - 60), *zoom, 5, 5, dots=False)
        d.text((zx + 40, 8), f"zoom: UA {zoom[0]:g}-{zoom[1]:g}%, drop {zoom[2]:g} to {zoom[3]:g}", fill="black")
    for row, (i, name) in enumerate(shown):
        col, ly = colours[i % len(colours)], 30 + 20 * row
        n_runs = sum(1 for k in records if k[0] == name)
        d.rectangle([main_w + 15, ly, main_w + 25, ly + 10], fill=col)
        d.text((main_w + 32, ly - 1), f"{name_label(name)} ({n_runs})", fill="black")
    d.text((main_w + 15, 30 + 20 * len(shown) + 10), "square: mean, bars: 95%\ninterval over concepts,\ndots: runs",
           fill="black")
    img.save(path, optimize=False)


def heatmap_figure(records: dict, path: Path) -> None:
    """Concept x method: UA and in-domain drop, each cell the 3-seed mean (left: white 0 to blue 100%;
    right: white 0 to red 40+ points). Drawn with PIL, byte-identical on every machine."""
    from PIL import Image, ImageDraw
    names = [n for n in evaluation.METHODS if any(k[0] == n for k in records)]
    cell, left, top, gap = 44, 130, 50, 30
    w, h = left + 2 * len(CONCEPTS) * cell + gap + 10, top + len(names) * cell + 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    panels = [("UA (%): share of forget images without the concept", "ua", 100.0, (31, 119, 180)),
              ("in-domain retain drop (points)", "retain_in_drop", 40.0, (214, 39, 40))]
    for p_i, (title, key, top_value, col) in enumerate(panels):
        x0 = left + p_i * (len(CONCEPTS) * cell + gap)
        d.text((x0, 8), title, fill="black")
        for j, concept in enumerate(CONCEPTS):
            d.text((x0 + j * cell + 2, top - 14), concept[:7], fill="black")
        for i, name in enumerate(names):
            if p_i == 0:
                d.text((6, top + i * cell + cell // 2 - 6), label(name).replace(" (baseline)", "*"), fill="black")
            for j, concept in enumerate(CONCEPTS):
                v = [f for (c, _), f in units_of(records, name, key).items() if c == concept]
                box = [x0 + j * cell, top + i * cell, x0 + (j + 1) * cell - 2, top + (i + 1) * cell - 2]
                if not v:
                    d.rectangle(box, outline=(200, 200, 200))
                    continue
                m = float(np.mean(v))
                a = min(max(m / top_value, 0.0), 1.0)
                fill = tuple(int(255 - (255 - c) * a) for c in col)
                d.rectangle(box, fill=fill)
                d.text((box[0] + 6, box[1] + cell // 2 - 7), f"{m:.0f}", fill="white" if a > 0.6 else "black")
    d.text((6, h - 22), "* baseline. Each cell: the mean over the seeds of that concept.", fill="black")
    img.save(path, optimize=False)


def forest_figure(claims: list[dict], path: Path) -> None:
    """One row per claim with a verdict: the paired difference signed so that right of 0 is the claimed
    side, the dot its mean, the thick bar the 95% interval, the thin line Holm's interval. Each row
    has its own scale (the claims are in different units), symmetric around 0, its end printed.
    Colour: the Holm verdict (green holds, red fails, grey inconclusive)."""
    from PIL import Image, ImageDraw
    rows = [c for c in claims if "holm_low" in c]
    row_h, left, plot_w, top = 22, 520, 300, 40
    w, h = left + plot_w + 80, top + row_h * len(rows) + 30
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((6, 8), "The claims: right of the line is the side each claim states (Holm's interval thin, 95% "
                   "thick)", fill="black")
    colours = {"holds": (44, 160, 44), "fails": (214, 39, 40), "inconclusive": (130, 130, 130)}
    zero = left + plot_w / 2
    d.line([(zero, top - 6), (zero, h - 24)], fill=(120, 120, 120))
    for i, c in enumerate(rows):
        y = top + i * row_h + row_h / 2
        sign = c["direction"]
        lo, hi, hlo, hhi = (sign * v for v in (c["low"], c["high"], c["holm_low"], c["holm_high"]))
        lo, hi, hlo, hhi = min(lo, hi), max(lo, hi), min(hlo, hhi), max(hlo, hhi)
        span = max(abs(hlo), abs(hhi), abs(lo), abs(hi), 1e-9) * 1.05

        def px(v):
            return zero + v / span * plot_w / 2
        col = colours[c["holm_verdict"]]
        text = f"{c['paper']}: {c['claim']}"
        d.text((6, y - 6), text if len(text) <= 84 else text[:81] + "...", fill="black")
        d.line([(px(hlo), y), (px(hhi), y)], fill=col, width=1)
        d.line([(px(lo), y), (px(hi), y)], fill=col, width=4)
        m = px(sign * c["mean"])
        d.ellipse([m - 3, y - 3, m + 3, y + 3], fill="black")
        d.text((left + plot_w + 6, y - 6), f"+-{span:.2g}", fill=(120, 120, 120))
    img.save(path, optimize=False)


def attack_section(records: dict) -> list[str]:
    """Does the concept come back? The embedding attack's success per method, beside the share of
    plain forget-prompt images that still show the concept (100 - UA) on the same runs."""
    base = load_base_attacks()
    attacked = {k: r for k, r in records.items() if "attack" in r}
    if not attacked:
        return []
    budget = next(iter(attacked.values()))["attack"]["budget"]
    seeds = sorted({s for (_, _, s) in attacked})
    lines = ["## Does the concept come back? The embedding attack", "",
             "`attack.py` learns one new token embedding v against each saved UNet (textual inversion, "
             "everything else frozen) from the base model's images of the concept, then samples \"" +
             budget["prompt"] + "\" and counts the images the judge calls the concept (ASR). Budget, the same for "
             f"every run: {budget['steps']} steps, lr {budget['lr']:g}, batch {budget['batch_size']}, "
             f"{budget['n_images']} images, initialised from \"{budget['init_word']}\"; "
             f"{next(iter(attacked.values()))['attack']['n_eval_images']} images judged per run. "
             "Attacked so far: " + ", ".join(f"{sum(1 for k in attacked if k[2] == s)} runs of seed {s}" for s in seeds)
             + " (which: the per-concept tables' ASR column). "
             "Control: the same attack against the base model"
             + (" recovers the concept in " + fmt_interval({u: 100 * r["asr"] for u, r in base.items()})
                + f"% of its images (min {100 * min(r['asr'] for r in base.values()):.1f}%, "
                f"{len(base)} (concept, seed) units)" if base else "") + "."
             + "".join(f" On {r['concept']} at seed {r['seed']} the control recovers {100 * r['asr']:.1f}%, below "
                       f"the {100 * CONTROL_BAR:.0f}% the attack must reach on the base model, so every "
                       "method's ASR on that unit is left out." for r in base.values() if r["asr"] < CONTROL_BAR), ""]
    rows = []
    for name in list(evaluation.METHODS) + list(VARIANTS):
        figs = {(c, s): figures(r) for (n, c, s), r in attacked.items() if n == name}
        if figs:
            rows.append([label(name), str(len(figs)), fmt_interval({u: 100 - f["ua"] for u, f in figs.items()}),
                         fmt_interval({u: f["asr"] for u, f in figs.items()}),
                         fmt_interval({u: f["asr"] - (100 - f["ua"]) for u, f in figs.items()})])
    header = ["method", "attacked runs", "concept in plain forget-prompt images (%, 100 - UA)",
              "concept in attack images (ASR, %)", "ASR minus (100 - UA) (pts)"]
    return lines + [evaluation.markdown_table(header, rows), ""]


def seed_set(records: dict, seeds: list[int]) -> dict:
    """The records of these seeds; on the held-out seeds, only those made from a committed tree
    (a --allow-dirty record, commit "...+changes", never enters the headline)."""
    return {k: r for k, r in records.items()
            if k[2] in seeds and not (seeds == TEST_SEEDS and r["commit"].endswith("+changes"))}


def seeds_name(seeds: list[int]) -> str:
    kind = "held-out test" if seeds == TEST_SEEDS else "development"
    return f"{kind} seeds {seeds[0]}-{seeds[-1]}"


def results_section(records: dict, seeds: list[int], heading: str) -> list[str]:
    """The per-method, per-kind and noise-floor tables of one seed set."""
    methods = evaluation.METHODS
    names = [n for n in list(methods) + list(VARIANTS) if any(k[0] == n for k in records)]
    n_main = sum(1 for (n, _, _) in records if n in methods)
    full = len(methods) * len(CONCEPTS) * len(seeds)
    total_time = sum(r["wall_time_s"] for (n, _, _), r in records.items() if n in methods)
    base_recs = [json.loads(p.read_text()) for p in sorted(RECORDS.glob("base/*.json"))]
    base_recs = [r for r in base_recs if r["seed"] in seeds]
    base_time = sum(r["eval_time_s"] for r in base_recs)
    lines = [f"## {heading}", ""]
    if n_main < full:
        lines += [f"**Partial: {n_main} of the {full} runs are recorded.** The intervals below are over the "
                  "concepts that exist; a method with fewer runs is measured on fewer concepts and seeds, so "
                  "compare methods only in the claims table, which pairs runs on the same units.", ""]
    lines += [method_table(records, names), ""]
    old_kid = [k for k, r in records.items() if r.get("kid_estimator") != KID_ESTIMATOR]
    if old_kid:
        lines += [f"KID-CLIP of {len(old_kid)} of these runs (recorded before 2026-12-04) used the earlier "
                  "estimator, which counted each base image's pair (same prompt, same seed) in its cross term: "
                  "it reads about 0.1 too low for a model that changes each image little, so those KID-CLIP "
                  "figures are comparable with each other, not with the unbiased ones.", ""]
    lines += [f"Time: {total_time / 3600:.2f} h of runs ({n_main} runs, each training plus one evaluation) and "
              f"{base_time / 60:.1f} min of base evaluations ({len(base_recs)}, shared by every method), "
              "on the machines the records name.", "",
              "Shapes and textures apart (the same runs; 6 shape and 4 texture concepts):", "",
              kind_table(records, names), ""]
    floors = [r["metrics"] for r in base_recs if "fd_clip_floor" in r["metrics"]]
    if floors:
        fl = {(r["concept"], r["seed"]): r["metrics"] for r in base_recs if "fd_clip_floor" in r["metrics"]}
        lines += ["The noise floor of the image-quality figures: the base model against itself (same retain "
                  "prompts, other seeds), over the (concept, seed) units: FD-CLIP "
                  + fmt_interval({u: m["fd_clip_floor"] for u, m in fl.items()}) + ", KID-CLIP "
                  + fmt_interval({u: m["kid_clip_floor"] for u, m in fl.items()}, 2)
                  + ". A method's figure inside this range is indistinguishable from not changing the model."
                  + (" (KID-CLIP here with the estimator its records name; the earlier one reads below 0.)"
                     if any(r.get("kid_estimator") != KID_ESTIMATOR for r in base_recs) else ""), ""]
    return lines


def n_weights(path: Path) -> int:
    """How many numbers a safetensors file holds, read from its header (nothing is loaded)."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def lora_section(records: dict) -> list[str]:
    """LoRA beside full weights, per method, on the units (development seeds) where both ran."""
    rows = []
    full_mb = 4 * n_weights(common.TOY_DIR / "pipeline" / "unet" / UNET_FILE) / 2 ** 20  # a saved float32 UNet
    for method in evaluation.METHODS:
        units = {(c, s) for (n, c, s) in records if n == f"{method}_lora"} & {(c, s) for (n, c, s) in records
                                                                             if n == method}
        if not units:
            continue
        for name in (method, f"{method}_lora"):
            recs = {u: records[(name, *u)] for u in units}
            cells = [fmt_interval({u: figures(r)[k] for u, r in recs.items()}) for k in
                     ("ua", "retain_in_drop", "worst_drop")]
            size = np.mean([r.get("result_mb", full_mb) for r in recs.values()])
            n_concepts, n_seeds = len({c for c, _ in units}), len({s for _, s in units})
            grid = (f"{n_concepts} x {n_seeds}" if len(units) == n_concepts * n_seeds else
                    f"{len(units)} runs, {n_concepts} concepts (not every seed yet)")
            rows.append([label(name), *cells, fmt(np.mean([r["wall_time_s"] for r in recs.values()]), 0),
                         fmt(size, 2), grid])
    if not rows:
        return []
    claims = holm([check_claim(records, c) for c in LORA_CLAIMS])
    claim_rows = [[c["claim"], str(c["n"]), "-" if c["n"] == 0 else
                   f"{fmt(c['mean'])} [{fmt(c['low'])}, {fmt(c['high'])}]", c["holm_verdict"]]
                  for c in claims if c["verdict"] != "not measured yet"]
    return ["## LoRA adapters beside full weights (development seeds)", "",
            "`--train lora`: peft adapters of rank 4 on the attention layers each method trains, at its own "
            "toy learning rate, chosen on seed 0 over the 10 concepts (the searches: docs/lab/searches/; SalUn "
            "and VDU refuse LoRA). Each pair of rows is measured "
            "on the same (concept, seed) units; wall time per run in seconds, result size in MB (a full-weight "
            "result is the whole toy UNet in float32). Wall times are those the records name, from different "
            "sessions and loads of the machine: compare them as a rough ratio only. Intervals over concepts, "
            "seeds averaged first.", "",
            evaluation.markdown_table(["method", "UA (%)", "in-domain drop (pts)", "worst-value drop (pts)",
                                       "wall time (s)", "result (MB)", "concepts x seeds"], rows), "",
            "Our claim, per method: LoRA forgets and keeps comparably to full weights (each within 5 points: "
            "the figure is LoRA's UA minus full weights' plus 5, or LoRA's drop minus full weights' minus 5; "
            "Holm's correction over these rows alone, apart from the papers' claims):", "",
            evaluation.markdown_table(["claim", "concepts", "difference [95%]", "verdict (Holm)"], claim_rows), ""]


def complete(records: dict, name: str) -> bool:
    """Whether `name` has every (concept, seed) unit of these records' seeds: the held-out seeds
    become the headline (and a claim's evidence) only whole, never from the first few units."""
    return len({(c, s) for (n, c, s) in records if n == name}) == len(CONCEPTS) * len(TEST_SEEDS)


def write_docs(records: dict, docs: Path, command_note: str) -> None:
    methods = evaluation.METHODS
    dev, test = seed_set(records, SEEDS), seed_set(records, TEST_SEEDS)
    whole = bool(test) and all(complete(test, m) for m in methods)
    headline, headline_seeds = (test, TEST_SEEDS) if whole else (dev, SEEDS)
    names = [n for n in list(methods) + list(VARIANTS) if any(k[0] == n for k in headline)]
    lines = ["# Toy benchmark: every method and the baselines, 10 concepts x 3 seeds", "",
             "Written by `python benchmarks/compare_toy.py --report-only` from the records in "
             "`benchmarks/records/` (one JSON per run; the command, the commit and the arguments of each "
             "are in it). " + command_note, ""]
    lines += ["Each run: the method's default toy settings, 64 images per group (forget, synonym, "
              "in-domain retain, cross-domain retain), judged by the toy judge; for a (concept, seed) every "
              "method is evaluated on the same prompts and evaluation seeds, against one base evaluation. "
              "Drops are base - unlearned, in points. The worst-value drop is the largest drop of any "
              "in-domain value: the neighbour the method damaged most. Forget-prompt fidelity: of the forget "
              "images whose prompt names another attribute (\"a red striped circle\"), the share in which the "
              "judge still reads those attributes; degenerate: the share the judge calls \"other\" on every "
              "head. KID-CLIP: the unbiased kernel distance between the retain images of the base and the "
              "unlearned model (CLIP features); FD-CLIP: the Frechet distance, biased at this sample size "
              "(see below). Intervals: mean [95% t-interval over the concepts]: the seeds of a concept are "
              "averaged first, since they are not independent units. The common bar: UA >= "
              f"{evaluation.COMMON_BAR['ua']:.0%}, in-domain and cross-domain retain each at most "
              f"{100 * evaluation.COMMON_BAR['retain_in_drop']:.0f} points below the base.", ""]
    if headline is dev:
        lines += ["The held-out test seeds (3-5) are not all recorded yet, so the tables below are the "
                  "development seeds 0-2, on which every default was chosen: they may flatter the methods.", ""]
    lines += results_section(headline, headline_seeds, f"Per method ({seeds_name(headline_seeds)})")
    if test and not whole:
        lines += results_section(test, TEST_SEEDS, f"Per method, {seeds_name(TEST_SEEDS)} so far (partial: "
                                 "not yet the headline)")
    lines += ["![retain drop against UA, per method and per run](tradeoff.png)", "",
              "![UA and in-domain drop per concept and method](heatmap.png)", ""]
    if headline is test:
        dev_names = [n for n in names if any(k[0] == n for k in dev)]
        lines += ["## Development minus test: the optimism of our tuning", "",
                  "Every default was chosen on seeds 0-2; seeds 3-5 were not looked at until the defaults were "
                  "frozen. Each concept's development mean minus its test mean, interval over the concepts:", "",
                  optimism_table(dev, test, dev_names), ""]
        lines += results_section(dev, SEEDS, f"Per method ({seeds_name(SEEDS)}, where the defaults were tuned)")
    scatter = quality_scatter(headline)
    if scatter:
        lines += ["## Which image-quality figure to trust", "",
                  "For every (method, concept) measured with 3 seeds: how much the figure moves between "
                  "seeds, against how much the 3-seed means differ between methods and concepts.", ""]
        lines += scatter + [""]
    lines += attack_section(records)
    lines += lora_section(dev)
    lines += [f"## Per concept ({seeds_name(headline_seeds)}: 3-seed mean, min to max in brackets)", "",
              "Own bar: UA >= " f"{evaluation.BAR_UA:.0%} with in-domain retain at most "
              + ", ".join(f"{100 * m['max_retain_drop']:.0f} ({label(k)})" for k, m in methods.items())
              + " points below the base (each paper's own standard).", ""]
    for name in names:
        lines += [f"### {label(name)}", "", concept_table(headline, name), ""]
    (docs / "results.md").write_text("\n".join(lines))
    write_claims(records, docs)
    tradeoff_figure({k: r for k, r in headline.items() if k[0] in methods}, docs / "tradeoff.png")
    heatmap_figure(headline, docs / "heatmap.png")


def claims_records(records: dict, claim) -> tuple[dict, list[int]]:
    """A claim is judged on the test seeds once both its sides have all of them, else on the development seeds."""
    sides = [claim[3]] + ([claim[4]] if isinstance(claim[4], str) else [])
    test = seed_set(records, TEST_SEEDS)
    if all(complete(test, side) for side in sides):
        return test, TEST_SEEDS
    return seed_set(records, SEEDS), SEEDS


def claims_table(claims: list[dict]) -> str:
    """The claims (check_claim + holm), one row each: source, the other side, seeds, units, the
    difference with its 95% and Holm intervals, both verdicts, and the unmatched difference."""
    rows = []
    for c in claims:
        unit = "%" if c["metric"] in ("ua", "retain_in") else " points"
        against = label(c["against"]) if isinstance(c["against"], str) else f"the figure {c['against']:g}{unit}"
        diff = "-" if c["n"] == 0 else (fmt(c["mean"]) if math.isnan(c["low"]) else
                                        f"{fmt(c['mean'])} [{fmt(c['low'])}, {fmt(c['high'])}]")
        adjusted = f"[{fmt(c['holm_low'])}, {fmt(c['holm_high'])}]" if "holm_low" in c else "-"
        unmatched = "-"
        if c["unmatched"] is not None and not math.isnan(c["unmatched"][0]):
            m, lo, hi = c["unmatched"]
            unmatched = fmt(m) if math.isnan(lo) else f"{fmt(m)} [{fmt(lo)}, {fmt(hi)}]"
        seeds = str(c["seeds"][0]) if len(c["seeds"]) == 1 else f"{c['seeds'][0]}-{c['seeds'][-1]}"
        rows.append([c["paper"], c["claim"], c["source"], against, seeds,
                     f"{c['n']} ({c['n_units']})", diff, adjusted, c["verdict"], c["holm_verdict"], unmatched])
    header = ["paper", "claim", "source", "against", "seeds", "concepts (runs)", "mean difference [95% interval]",
              "Holm interval", "verdict (unadjusted)", "verdict (Holm)", "every paired unit, forgotten or not"]
    return evaluation.markdown_table(header, rows)


def write_claims(records: dict, docs: Path) -> None:
    claims = []
    for c in CLAIMS:
        recs, seeds = claims_records(records, c)
        claims.append({**check_claim(recs, c), "seeds": seeds})
    holm(claims)
    changed = sum(c["verdict"] != c["holm_verdict"] for c in claims)
    family = sum("holm_low" in c for c in claims)
    out = ["# The papers' claims, checked on the toy", "",
           "Written by `python benchmarks/compare_toy.py --report-only` from `benchmarks/records/`. Each row "
           "pairs the two methods on the (concept, seed) units both were run on, averages each concept's "
           "paired differences over its seeds (first method minus the other, or minus the stated figure), "
           "and gives the mean over the concepts with its 95% t-interval (unadjusted) and with the interval "
           "of Holm's correction over the claims table (family-wise 5%: the claim with the i-th smallest "
           "p-value of m is tested at 5% / (m - i + 1)). Verdict (Holm): holds (the interval is on the "
           "claimed side of 0, and every claim before it in Holm's order was resolved), fails (on the "
           "other side), inconclusive (otherwise), not measured yet (fewer than 2 concepts). Image-quality "
           "claims and \"2 vs 3 snapshots\" are made only on the units where both sides forget (UA >= 90%): "
           f"with fewer than {MIN_FORGOTTEN_CONCEPTS} such concepts a claim is not testable; their difference "
           "over every paired unit is shown beside, never as a verdict. In the rows \"within 5 points\" the "
           "figure is the UA difference plus those 5 points. Seeds: the held-out test seeds 3-5 once both "
           "sides have all 30 units, otherwise the development seeds 0-2 (where every default was tuned). Source: "
           "where the paper states the claim (a summary of a paper is weaker evidence than its abstract or "
           "one of its tables; \"our reading\" marks a claim this project infers from what the paper says the "
           "method contains). A claim that fails on the toy is a finding about the toy and our "
           "reconstruction, reported as measured.", "",
           f"Holm changed {changed} of the {family} verdicts in its family.", "",
           "![each claim's difference with its 95% and Holm intervals](forest.png)", ""]
    out += [claims_table(claims)]
    out += ["", "Variants (`python benchmarks/compare_toy.py --methods <variant>`): " + "; ".join(
        f"`{v}` = {label(v)}" for v in VARIANTS) + ". A claim on a variant reads \"not measured yet\" until "
        "its runs are recorded.", "", "MiM-MU's claims about several concepts and sequences (no resurgence, no "
        "degradation of unrelated concepts, unlike SalUn) are checked on their own units by "
        "`benchmarks/compare_multi.py`: " + ("[multi.md](multi.md)." if any(MULTI_RECORDS.glob("*/*.json"))
                                             else "no run of it is recorded yet.")]
    (docs / "claims.md").write_text("\n".join(out) + "\n")
    forest_figure(claims, docs / "forest.png")


def compare_grid(path: Path, concepts=("circle", "striped"), seed: int = 0, n_seeds: int = 2) -> bool:
    """docs/results/compare.png: base + every method on the same prompts and seeds (two forget prompts and
    two in-domain retain prompts per concept), from the saved UNets of seed `seed` in outputs/.
    Needs the weights, so only a run (not --report-only) writes it; False if some are missing."""
    folders = {(m, c): WORK / f"{m}-{c}-seed{seed}" / "unet" for m in evaluation.METHODS for c in concepts}
    if not all(f.exists() for f in folders.values()):
        return False
    models = common.load_models("toy", torch.device("cpu"))
    rows, labels = [], []
    for c in concepts:
        ps = common.concept_prompts(c, models)
        prompts = ps.forget[:2] + [p for p, _ in ps.retain_in[:2]]
        flat = [p for p in prompts for _ in range(n_seeds)]
        seeds = [s for _ in prompts for s in range(n_seeds)]
        columns = [common.sample(models, flat, seeds).images]
        for m in evaluation.METHODS:
            columns.append(common.sample(models, flat, seeds, unet=common.load_unet(folders[(m, c)])).images)
        rows.append(torch.stack(columns, 1))
        labels += [f"{p} (seed {s})" for p, s in zip(flat, seeds)]
    common.image_grid(torch.cat(rows), path, labels, ["base"] + [m["label"].replace(" (baseline)", "*")
                                                                  for m in evaluation.METHODS.values()])
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=list(evaluation.METHODS),
                   choices=list(evaluation.METHODS) + list(VARIANTS),
                   help="methods, baselines or variants to run (default: the four and both baselines)")
    p.add_argument("--concepts", nargs="*", default=CONCEPTS, choices=CONCEPTS, help="toy concepts")
    p.add_argument("--seeds", nargs="*", type=int, default=SEEDS, help="seeds")
    p.add_argument("--report-only", action="store_true", help="run nothing: rewrite the docs from the records")
    p.add_argument("--attack", action="store_true", help="run the embedding attack (attack.py) on the saved runs "
                   "that have none yet, instead of training")
    p.add_argument("--docs", default="docs/results", help="where results.md, claims.md, tradeoff.png and "
                   "compare.png go")
    p.add_argument("--shard", metavar="K/N", help="run only the K-th of N deterministic slices of the (seed, "
                   "concept) units, e.g. one per machine of a job array; the records merge by git")
    p.add_argument("--allow-dirty", action="store_true", help="run from a tree with uncommitted code changes "
                   "(development only: such records are marked and never enter the headline)")
    args = p.parse_args()
    units = shard([(seed, concept) for seed in args.seeds for concept in args.concepts], args.shard)
    if not args.report_only:
        require_clean_tree(args.allow_dirty)
    if args.attack and not args.report_only:
        attacker, started, made = None, time.time(), 0
        for seed, concept in units:
            for name in ["base"] + args.methods:
                attacker = attacker or Attacker()
                made += attacker.one(name, concept, seed) is not None
        print(f"{made} attacks made in {(time.time() - started) / 60:.1f} min")
    elif not args.report_only:
        ev, started, made = None, time.time(), 0
        # concept and seed outermost: each base evaluation is made once and every method reuses it
        for seed, concept in units:
            for name in args.methods:
                if record_path(name, concept, seed).exists():
                    continue
                ev = ev or Evaluator()
                made += run_method(name, concept, seed, ev) is not None
        print(f"{made} runs made in {(time.time() - started) / 60:.1f} min ({os.cpu_count()} CPU cores, "
              f"{platform.machine()}, {datetime.date.today()})")
        if not args.shard and compare_grid(ROOT / args.docs / "compare.png"):
            print(f"wrote {ROOT / args.docs / 'compare.png'} (* = baseline)")
    if args.shard and not args.report_only:  # shards merge records by git; the docs are written once, after
        print("records written; after the merge: python benchmarks/compare_toy.py --report-only")
        return
    docs = ROOT / args.docs
    docs.mkdir(parents=True, exist_ok=True)
    write_docs(load_records(), docs, "Runs are made by `python benchmarks/compare_toy.py` (missing records only).")
    print(f"wrote {docs / 'results.md'}, {docs / 'claims.md'}, {docs / 'tradeoff.png'}")


if __name__ == "__main__":
    main()
