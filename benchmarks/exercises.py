"""The README's exercises, run as they are stated and measured with today's code and judge.

Writes docs/exercises.md, the long version of the exercises: each one's text, the commands it asks
for, and what they measured (UA, in-domain retain, its worst value, cross-domain retain, wall
time; the probes' own printed tables), with the seed and the commit of every run.

    python benchmarks/exercises.py                 # run what is missing (about 50 min, 2 cores)
    python benchmarks/exercises.py --only 4        # exercise 4 only
    python benchmarks/exercises.py --list          # the commands, and whether each edit applies
    python benchmarks/exercises.py --report-only   # rewrite docs/exercises.md from the records

An exercise that asks for a code edit (1 and 3) runs on a temporary copy of the repository's
top-level .py files, with the edit made by a string replacement that must match exactly once: if
the code has changed so that the instruction no longer applies, the script stops and says so.
The real files are never touched.

Every run leaves a record, benchmarks/records/exercises/ex<N>-<run>.json (the command, the edit,
the commit, the metrics or printed output, the progress bar's values, the wall time), and its
output folder in outputs/exercises/ex<N>-<run>/ (before_after.png, metrics.json). A run whose
record holds the same command is not redone, so the script resumes where it stopped; after a
change to a method or the judge, delete the records of the exercises it touches and run again.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from compare_toy import RECORDS as BENCHMARK_RECORDS, ROOT, commit, write_json

RECORDS = BENCHMARK_RECORDS / "exercises"
DOC = ROOT / "docs" / "exercises.md"
OUTPUTS = ROOT / "outputs" / "exercises"


def toy(script: str, concept: str, *extra: str, seed: int = 0) -> list[str]:
    """A method's command line on the toy model, as a student types it."""
    return [script, "--model", "toy", "--concept", concept, "--seed", str(seed), *extra]


CRITIC_PROBE = "benchmarks/probes/critic_input_ablation.py"
EXPLORATION_PROBE = "benchmarks/probes/exploration_by_guidance.py"
OLD_CGRU = ["--sample-steps", "20", "--iterations", "30", "--lr", "3e-4", "--kl-weight", "0"]

# Each exercise: its title and text (the README's and the old long version's wording, without
# measured numbers: the tables give those), a code edit or None, its runs as (record name, row
# label, command), the error text a run may stop with as its observation, extra table columns
# (see COLUMNS), and benchmark records shown beside the runs as (method, concept, seed, label).
EXERCISES = {
    1: dict(
        title="The sign of PURE's preference loss",
        text="""In `pure.forget_loss`, replace `F.logsigmoid(beta * delta)` by the DPO "winner" form
`F.logsigmoid(-beta * delta)` and run `python pure.py --model toy --concept circle --overwrite`.
Watch `delta` in the progress bar (its last value is in the table): with the edit the model is
trained to explain the forget images *better* than the reference does. Compare UA with the
unedited default's: are circles still drawn? `tests/test_pure.py` catches this edit.""",
        edit=dict(file="pure.py", old="F.logsigmoid(beta * delta)", new="F.logsigmoid(-beta * delta)"),
        runs=[("edited", "with the edit", toy("pure.py", "circle"))],
        columns=["delta"], references=[("pure", "circle", 0, "default, unedited")]),
    2: dict(
        title="What saturation buys",
        text="""`beta` decides how soon PURE stops pushing a forget sample. With `--lr 5e-4 --steps 100
--kl-weight 1` (the toy defaults before the search), forget triangle with `--beta 100` and with
`--beta 1000`, and dotted with `--beta 1000`:
`python pure.py --model toy --concept triangle --lr 5e-4 --steps 100 --kl-weight 1 --beta B
--overwrite`. Explain why a larger beta protects the other shapes and forgets less, and why the
default (`TOY_DEFAULTS` in `pure.py`) pairs a smaller step and more steps with a softer beta.""",
        runs=[(f"{c}-beta{b}", f"{c}, beta {b}", toy("pure.py", c, "--lr", "5e-4", "--steps", "100",
                                                      "--kl-weight", "1", "--beta", str(b)))
              for c, b in (("triangle", 100), ("triangle", 1000), ("dotted", 1000))]),
    3: dict(
        title="MiM-MU's frozen target",
        text="""In `mim_mu.loss`, compute `target` with `unet` (the model being trained) instead of
`unet_ref`, and run `python mim_mu.py --model toy --concept circle --overwrite`. The empty-prompt
anchor now pulls toward a moving point and holds nothing: compare in-domain and cross-domain
retain with the base model's and the unedited default's. Does every prompt now produce the same
picture (`before_after.png`)? Then try `--no-anchor-uncond` with the frozen target and compare
the unconditional samples.""",
        edit=dict(file="mim_mu.py", old="target = unet_ref(", new="target = unet("),
        runs=[("edited", "with the edit", toy("mim_mu.py", "circle"))],
        references=[("mim_mu", "circle", 0, "default, unedited")]),
    4: dict(
        title="VDU's knife edge",
        text="""Run the paper's recipe without our bound,
`python vdu.py --model toy --concept circle --precision-from checkpoints --ascent-bound 0
--steps 100 --gamma G --overwrite`, for G = 0.5, 0.95, 0.97, 0.99: the ascent either runs away
(the run stops with "the forget loss A ran away") or forgets nothing. Plot A over the steps from
the progress bar (the table gives its first and last value) and explain why a quadratic anchor
cannot stop an unbounded ascent. Then put the bound back (`--ascent-bound 3`), switch the
precision source, and compare with [lab/searches/vdu.md](lab/searches/vdu.md).""",
        runs=[(f"gamma{g}", f"gamma {g}", toy("vdu.py", "circle", "--precision-from", "checkpoints",
                                              "--ascent-bound", "0", "--steps", "100", "--gamma", g))
              for g in ("0.5", "0.95", "0.97", "0.99")],
        stops="ran away", columns=["A"], references=[("vdu", "circle", 0, "default (bounded ascent)")]),
    5: dict(
        title="Which advantage estimator?",
        text="""Run `python rl_critic.py --model toy --concept circle --gae-lambda L --overwrite` for
L = 0 (only per-step critic differences: low variance, biased by the critic) and L = 1 (terminal
reward minus the critic's value: unbiased, noisier). Compare UA after the same iterations and the
share of PPO ratios that leave the clip range (printed in the progress bar as `clipped`; the table
gives its mean over the iterations), and rerun both with `--seed 1` before believing a gap: is
the gap between the lambdas larger than the one between the seeds, or than those between
near-identical settings in [lab/searches/rl_critic.md](lab/searches/rl_critic.md)? The default, 0.95, is the
benchmark's run. How much the critic knows is exercise 6's question: lambda 0 trusts it fully,
lambda 1 ignores it. If most ratios leave the clip range, work out which samples still give a
gradient (hint: the min picks the unclipped term when the ratio moved against the advantage).""",
        runs=[(f"lambda{lam}-seed{s}", f"lambda {lam}", toy("rl_critic.py", "circle", "--gae-lambda", lam, seed=s))
              for s in (0, 1) for lam in ("0", "1")],
        columns=["clipped"],
        references=[("rl_critic", "circle", s, "default, lambda 0.95") for s in (0, 1)]),
    6: dict(
        title="What the critic needs to see",
        text="""Run `python benchmarks/probes/critic_input_ablation.py --concept circle`. It fits three
critics (x_t with FiLM, the default; `--no-timestep`; `--critic-input x0_hat`) on the same base
trajectories and scores them on held-out ones, so no policy noise gets in the way. It prints the
MSE over all steps and by thirds of the trajectory (noisiest first) beside the variance of the
held-out rewards, which is what a critic that explains nothing scores. What share of that
variance does each critic explain, and is the last third, where the decoded state is almost the
final image, any better than the first? Explain why the rare forget samples that are not circles
dominate the standardised reward's variance, and why a few rollouts cannot teach a critic even
the last step; then give the critic the CLIP cosine between state and prompt as an input and
measure again.""",
        runs=[("probe", "probe", [CRITIC_PROBE, "--concept", "circle"])]),
    7: dict(
        title="A policy gradient learns only what the policy samples",
        text="""Run `python benchmarks/probes/exploration_by_guidance.py`: for circle and striped forget
prompts it prints how often the base policy (stochastic DDIM, the policy CGRU trains) draws
something the judge does not call the concept, at guidance 1, 2, 3 and 5 (the toy samples and is
evaluated at 5; CGRU's toy policy trains at 1). Then train with CGRU's old toy defaults at both
scales, `python rl_critic.py --model toy --concept circle --sample-steps 20 --iterations 30
--lr 3e-4 --kl-weight 0 --guidance-scale G --overwrite` for G = 5 and 1. Explain why the reward's
quality (CLIP tells circles from other shapes almost perfectly) cannot make up for samples that
never show anything else, and why training at guidance 1 still changes what the model draws
at 5.""",
        runs=[("probe", "probe", [EXPLORATION_PROBE])]
        + [(f"guidance{g}", f"old defaults, guidance {g}",
            toy("rl_critic.py", "circle", *OLD_CGRU, "--guidance-scale", g)) for g in ("5", "1")]),
    8: dict(
        title="Reward hacking",
        text="""Run `python rl_critic.py --model toy --concept dotted` and open its `before_after.png`:
what do the forget rows show? Compare the CLIP forget score (the cosine to the forget prompts,
which the default reward pays to lower) with the judge's UA. Then run the same with
`--reward clip-zero-shot --overwrite`, which pays 1 - p(dotted) from CLIP zero-shot over the four
textures, and explain why a blank canvas lowers the cosine to "a dotted shape" but not p(dotted).
Then run both rewards on triangle; find which shapes each damaged in `metrics.json`
(`retain_in_per_value`, in the table), and explain why a reward that pays "looks like another
shape" can move the other shapes' own prompts. Last, run the default reward with `--seed 1`.
Which run tells you more about the reward, and how many seeds would you want before trusting
either?""",
        runs=[("dotted-clip", "dotted, default reward", toy("rl_critic.py", "dotted")),
              ("dotted-clip-zero-shot", "dotted, clip-zero-shot", toy("rl_critic.py", "dotted", "--reward",
                                                                       "clip-zero-shot")),
              ("triangle-clip", "triangle, default reward", toy("rl_critic.py", "triangle")),
              ("triangle-clip-zero-shot", "triangle, clip-zero-shot", toy("rl_critic.py", "triangle", "--reward",
                                                                           "clip-zero-shot")),
              ("dotted-clip-seed1", "dotted, default reward", toy("rl_critic.py", "dotted", seed=1))],
        columns=["clip_forget", "per_value"]),
}

# --smoke (a test of this script, not of the exercises): every command shortened to seconds
SMOKE = {"pure.py": ["--steps", "2"], "mim_mu.py": ["--epochs", "1"], "vdu.py": ["--steps", "2"],
         "rl_critic.py": ["--iterations", "1"], CRITIC_PROBE: ["--train-rollouts", "1", "--epochs", "1"],
         EXPLORATION_PROBE: ["--n", "4", "--steps", "2", "--guidance", "1", "5"]}


def is_probe(argv: list[str]) -> bool:
    return argv[0].startswith("benchmarks/probes/")


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def command(argv: list[str]) -> str:
    return " ".join(["python", *argv])


# ---------------------------------------------------------------------------------------------
# Code edits: made on a temporary copy, and only if the instruction still matches the code
# ---------------------------------------------------------------------------------------------

def applied(text: str, edit: dict) -> str:
    """`text` with the edit made, or a ValueError if its string is not there exactly once."""
    count = text.count(edit["old"])
    if count != 1:
        raise ValueError(f"the exercise's edit no longer applies: {edit['file']} contains {edit['old']!r} "
                         f"{count} times, not once; update the exercise in benchmarks/exercises.py.")
    return text.replace(edit["old"], edit["new"])


def edited_copy(folder: Path, edit: dict) -> Path:
    """`folder` as a mirror of the repository to run in: the top-level .py files copied, with `edit`
    made in its copy, every other entry (toy/, baselines/, ...) a link to the real one."""
    if "/" in edit["file"]:  # a file under a linked folder would be edited in place
        raise ValueError(f"edits are made to top-level files only, not {edit['file']}.")
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or entry.name in ("outputs", "__pycache__"):
            continue
        if entry.suffix == ".py":
            shutil.copy(entry, folder / entry.name)
        else:
            (folder / entry.name).symlink_to(entry)
    target = folder / edit["file"]
    target.write_text(applied(target.read_text(), edit))
    return folder


# ---------------------------------------------------------------------------------------------
# Running: one command per run, each leaving a record
# ---------------------------------------------------------------------------------------------

# key=value pairs of a tqdm postfix, as common.show writes them ("{:.4g}")
PAIR = re.compile(r"(\w+)=([-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|nan|inf))")
COUNTER = re.compile(r"^\s*([^:]*):.*?\|\s*(\d+)/\d+")


def bar_values(stderr: str) -> list[dict]:
    """The loss terms shown by the progress bar at each step. tqdm redraws the bar with "\\r", so a
    step can be drawn more than once: the last drawing of each (bar, step) counts."""
    shown = {}
    for line in re.split(r"[\r\n]", stderr):
        counter, pairs = COUNTER.match(line), PAIR.findall(line)
        if counter and pairs:
            shown[counter.groups()] = {k: float(v) for k, v in pairs}
    return list(shown.values())


def printed_tables(stdout: str) -> str:
    """A probe's result: its first markdown table, the paragraph above it (the caption) and all
    that follows; the progress lines printed before are left out."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", stdout) if p.strip()]
    tables = [i for i, p in enumerate(paragraphs) if p.startswith("|")]
    return "\n\n".join(paragraphs[max(0, tables[0] - 1):]) if tables else stdout.strip()


def run_one(n: int, name: str, argv: list[str], records: Path, outputs: Path, smoke: bool) -> dict | None:
    """Run one command of exercise `n` (on an edited copy if the exercise asks for an edit) and
    write its record; None if it failed other than as the exercise says it may."""
    ex = EXERCISES[n]
    out = outputs / f"ex{n}-{name}"
    cmd = [sys.executable, *argv, *(SMOKE.get(argv[0], []) if smoke else [])]
    if not is_probe(argv):
        cmd += ["--output-dir", str(out), "--overwrite"] + (["--n-eval-images", "8"] if smoke else [])
    outputs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="exercise-") as tmp:
        cwd = edited_copy(Path(tmp), ex["edit"]) if ex.get("edit") else ROOT
        started = time.time()
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        wall = time.time() - started
    log = outputs / f"ex{n}-{name}.log"
    log.write_text(r.stdout + r.stderr)
    errors = [line[len("error: "):] for line in r.stderr.splitlines() if line.startswith("error: ")]
    # a one-sentence error (exit code 2) is the observation when the exercise says the run may stop
    stopped = r.returncode == 2 and bool(ex.get("stops")) and bool(errors) and ex["stops"] in errors[-1]
    if r.returncode != 0 and not stopped:
        print(f"  ex{n}-{name}: FAILED (exit code {r.returncode}), see {log}", flush=True)
        return None
    rec = {"exercise": n, "run": name, "command": command(argv), "edit": ex.get("edit"),
           "seed": None if flag(argv, "--seed") is None else int(flag(argv, "--seed")), "commit": commit(),
           "cpus": os.cpu_count(), "wall_time_s": round(wall, 1), "smoke": smoke}
    if is_probe(argv):
        rec["output"] = printed_tables(r.stdout)
    else:
        rec["bar"] = bar_values(r.stderr)
        if stopped:
            rec["stopped"] = errors[-1]
        else:
            metrics = json.loads((out / "metrics.json").read_text())
            rec.update(base=metrics["base"], unlearned=metrics["unlearned"],
                       args=json.loads((out / "run.json").read_text())["args"])
    write_json(records / f"ex{n}-{name}.json", rec)
    result = rec.get("stopped") or (f"UA {rec['unlearned']['ua']:.0%}, retain in {rec['unlearned']['retain_in']:.0%}"
                                    if "unlearned" in rec else "printed its table")
    print(f"  ex{n}-{name}: {result} ({wall:.0f}s)", flush=True)
    return rec


def load_record(records: Path, n: int, name: str, argv: list[str]) -> dict | None:
    """The record of a run, if it was made with this command (an exercise changed since is rerun)."""
    path = records / f"ex{n}-{name}.json"
    if not path.exists():
        return None
    rec = json.loads(path.read_text())
    return rec if rec["command"] == command(argv) else None


# ---------------------------------------------------------------------------------------------
# The document
# ---------------------------------------------------------------------------------------------

def wrap(paragraph: str) -> str:
    return textwrap.fill(paragraph, 100, break_long_words=False, break_on_hyphens=False)


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def bar_series(rec: dict, key: str) -> list[float]:
    return [step[key] for step in rec.get("bar", []) if key in step]


def last_delta(rec: dict) -> str:
    values = bar_series(rec, "delta")
    return f"{values[-1]:.3g}" if values else "-"


def first_to_last_a(rec: dict) -> str:
    values = bar_series(rec, "A")
    return f"{values[0]:.3g} -> {values[-1]:.3g}" if values else "-"


def mean_clipped(rec: dict) -> str:
    values = bar_series(rec, "clipped")
    return f"{sum(values) / len(values):.2f}" if values else "-"


def clip_forget(rec: dict) -> str:
    if "unlearned" not in rec:
        return "-"
    now = f"{rec['unlearned']['clip_forget']:.0f}"
    return f"{rec['base']['clip_forget']:.0f} -> {now}" if "base" in rec else now


def per_value(rec: dict) -> str:
    if "unlearned" not in rec:
        return "-"
    return ", ".join(f"{v} {pct(x)}" for v, x in rec["unlearned"]["retain_in_per_value"].items())


# the extra columns an exercise may ask for: name -> (header, its cell from a record; a record
# holds "unlearned" (the row's metrics) and, for a run, "base" and "bar")
COLUMNS = {"delta": ("delta, last in the bar", last_delta),
           "A": ("A in the bar, first -> last", first_to_last_a),
           "clipped": ("clipped share, mean over the bar", mean_clipped),
           "clip_forget": ("CLIP forget score, base -> unlearned", clip_forget),
           "per_value": ("in-domain retain per value", per_value)}


def table_row(label: str, seed: int, rec: dict | None, ex: dict) -> str:
    """One row: the metrics of `rec["unlearned"]`, or why there are none."""
    extra = [COLUMNS[c][1](rec) if rec else "-" for c in ex.get("columns", [])]
    if rec is None:
        cells = ["not run yet", "-", "-", "-"]
    elif "unlearned" not in rec:  # stopped with the error the exercise is about
        cells = ["-", "-", "-", "-"]
    else:
        m = rec["unlearned"]
        cells = [pct(m["ua"]), pct(m["retain_in"]), f"{m['retain_in_worst_value']} {pct(m['retain_in_worst'])}",
                 pct(m["retain_cross"]) if "retain_cross" in m else "-"]
    if ex.get("stops"):
        extra.append(rec["stopped"].split(";")[0] if rec and "stopped" in rec else "-")
    wall = f"{rec['wall_time_s']:.0f}" if rec and "wall_time_s" in rec else "-"
    return "| " + " | ".join([label, str(seed), *cells, *extra, wall, rec["commit"] if rec else "-"]) + " |"


def exercise_section(n: int, ex: dict, records: Path) -> list[str]:
    lines = [f"## {n}. {ex['title']}", "", ex["text"], ""]
    edit = ex.get("edit")
    if edit:
        lines += [wrap(f"The script makes the edit in a temporary copy of `{edit['file']}` (the string must "
                       f"occur there exactly once): `{edit['old']}` -> `{edit['new']}`."), ""]
    lines += ["```", *[command(argv) for _, _, argv in ex["runs"]], "```", ""]
    recs = {name: load_record(records, n, name, argv) for name, _, argv in ex["runs"]}
    for name, _, argv in ex["runs"]:
        if is_probe(argv):
            rec = recs[name]
            lines += [wrap(f"`{command(argv)}` printed (commit {rec['commit']}, {rec['wall_time_s']:.0f} s):"), "",
                      rec["output"], ""] if rec else [f"`{command(argv)}`: not run yet.", ""]
    runs = [(name, label, argv) for name, label, argv in ex["runs"] if not is_probe(argv)]
    if not runs:
        return lines
    headers = ["run", "seed", "UA", "in-domain retain", "worst in-domain value", "cross-domain retain",
               *[COLUMNS[c][0] for c in ex.get("columns", [])], *(["stopped"] if ex.get("stops") else []),
               "wall time (s)", "commit"]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    # the base model first, once per (concept, seed), from the first run that evaluated it
    bases = {}
    for name, _, argv in runs:
        key = (flag(argv, "--concept"), int(flag(argv, "--seed")))
        if recs[name] and "base" in recs[name]:
            bases.setdefault(key, recs[name])
    for (concept, seed), rec in bases.items():
        lines.append(table_row(f"base model ({concept})", seed, {"unlearned": rec["base"], "commit": rec["commit"]},
                               ex))
    for name, label, argv in runs:
        lines.append(table_row(label, int(flag(argv, "--seed")), recs[name], ex))
    for method, concept, seed, label in ex.get("references", []):
        path = BENCHMARK_RECORDS / method / f"{concept}-seed{seed}.json"
        rec = json.loads(path.read_text()) if path.exists() else None
        lines.append(table_row(f"{label} ([benchmark record](../{path.relative_to(ROOT)}))", seed, rec, ex))
    return lines + [""]


def write_doc(records: Path, path: Path) -> None:
    cpus = sorted({json.loads(p.read_text())["cpus"] for p in records.glob("*.json")})
    lines = ["# Exercises, in full", "", wrap(
        "Written by `python benchmarks/exercises.py` from the records in `benchmarks/records/exercises/` "
        "(`--report-only` rewrites it from them); do not edit it by hand. The README states each exercise in "
        "short; this is the long version, with what each exercise's runs measured, so you can check your own. "
        "Toy model, 64 images per evaluation group, seed 0 unless a row says otherwise"
        + (f", on machines with {' or '.join(map(str, cpus))} CPU cores" if cpus else "") + ". "
        "Each run's folder (`before_after.png`, `metrics.json`) is kept in `outputs/exercises/`."), "", wrap(
        "UA: the share of forget-prompt images the judge does not call the concept. In-domain retain: the share "
        "of the other values of the same kind (the other shapes, for a shape) that the judge still reads right; "
        "the worst in-domain value is the one the run damaged most. Cross-domain retain: the same for the other "
        "kinds' prompts. Wall time: the whole command (for a benchmark record: its training and one evaluation). "
        "These are single runs: other seeds move some of them by many points, which exercises 5 and 8 ask you "
        "to see for yourself."), ""]
    for n, ex in EXERCISES.items():
        lines += exercise_section(n, ex, records)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def edit_problem(ex: dict) -> str | None:
    """Why the exercise's edit no longer applies to today's file, or None."""
    edit = ex.get("edit")
    try:
        if edit:
            applied((ROOT / edit["file"]).read_text(), edit)
    except (ValueError, OSError) as e:
        return str(e)
    return None


def list_commands(selected: list[int], records: Path) -> bool:
    """Print every command of the selected exercises; False if an edit no longer applies."""
    ok = True
    print("(each method run also gets --output-dir outputs/exercises/ex<N>-<run> --overwrite)")
    for n in selected:
        ex = EXERCISES[n]
        edit, problem = ex.get("edit"), edit_problem(ex)
        print(f"exercise {n}: {ex['title']}")
        if edit:
            print(f"  edit {edit['file']}: {edit['old']!r} -> {edit['new']!r}: "
                  + (f"NO LONGER APPLIES: {problem}" if problem else "applies (matches once)"))
        ok = ok and problem is None
        for name, _, argv in ex["runs"]:
            done = " [recorded]" if load_record(records, n, name, argv) else ""
            print(f"  ex{n}-{name}: {command(argv)}{done}")
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", type=int, default=list(EXERCISES), help="run these exercises only")
    p.add_argument("--list", action="store_true", help="print the commands, check the edits, run nothing")
    p.add_argument("--report-only", action="store_true", help=f"run nothing: rewrite {DOC.relative_to(ROOT)} "
                   "from the records")
    # a test of this script: every command shortened, records and document in a temporary folder
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    unknown = [n for n in args.only if n not in EXERCISES]
    if unknown:
        p.error(f"there is no exercise {unknown[0]}; the exercises are {', '.join(map(str, EXERCISES))}.")
    records, doc, outputs = RECORDS, DOC, OUTPUTS
    if args.smoke:
        records = Path(tempfile.mkdtemp(prefix="exercises-smoke-"))
        doc, outputs = records / "exercises.md", records / "outputs"
    if args.list:
        sys.exit(0 if list_commands(args.only, records) else 1)
    failed = 0
    if not args.report_only:
        problems = [f"exercise {n}: {edit_problem(EXERCISES[n])}" for n in args.only if edit_problem(EXERCISES[n])]
        if problems:  # before any run: a stale exercise is fixed first, not measured
            print("error: " + "\n".join(problems), file=sys.stderr)
            sys.exit(2)
        started = time.time()
        for n in args.only:
            for name, _, argv in EXERCISES[n]["runs"]:
                if load_record(records, n, name, argv) is None:
                    failed += run_one(n, name, argv, records, outputs, args.smoke) is None
        print(f"done in {(time.time() - started) / 60:.1f} min")
    write_doc(records, doc)
    print(f"wrote {doc}")
    if failed:
        print(f"error: {failed} run(s) failed (see FAILED above); their rows read \"not run yet\".", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
