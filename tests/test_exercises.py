"""benchmarks/exercises.py, without training: the exercises still apply to today's code (each edit
matches its file exactly once, each command is accepted by its script), and --list prints them."""

import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import exercises  # noqa: E402

EDITS = [n for n, ex in exercises.EXERCISES.items() if ex.get("edit")]
RUNS = [(n, name, argv) for n, ex in exercises.EXERCISES.items() for name, _, argv in ex["runs"]]
METHOD_RUNS = [(n, name, argv) for n, name, argv in RUNS if not exercises.is_probe(argv)]
PROBES = sorted({argv[0] for _, _, argv in RUNS if exercises.is_probe(argv)})


@pytest.mark.slow(5)
def test_list_prints_every_command_and_finds_every_edit_applicable():
    r = subprocess.run([sys.executable, "benchmarks/exercises.py", "--list"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    # " [recorded]" follows a run whose record exists
    listed = [line.strip().removesuffix(" [recorded]") for line in r.stdout.splitlines() if line.startswith("  ex")]
    assert listed == [f"ex{n}-{name}: {exercises.command(argv)}" for n, name, argv in RUNS]
    assert len(listed) == 22
    assert r.stdout.count("applies (matches once)") == len(EDITS) == 2


@pytest.mark.parametrize("n", EDITS)
def test_the_edit_of_exercise_n_matches_todays_file_exactly_once(n):
    edit = exercises.EXERCISES[n]["edit"]
    text = (ROOT / edit["file"]).read_text()
    assert text.count(edit["old"]) == 1
    edited = exercises.applied(text, edit)
    assert edited.count(edit["new"]) == text.count(edit["new"]) + 1


def test_an_edit_whose_string_is_gone_is_refused_with_a_sentence():
    edit = dict(file="pure.py", old="F.logsigmoid(beta * delta)", new="F.logsigmoid(-beta * delta)")
    with pytest.raises(ValueError, match="no longer applies: pure.py contains .* 0 times"):
        exercises.applied("return -F.logsigmoid(delta)\n", edit)


@pytest.mark.parametrize("n, name, argv", METHOD_RUNS, ids=[f"ex{n}-{name}" for n, name, _ in METHOD_RUNS])
def test_every_exercise_command_is_accepted_by_its_script(n, name, argv):
    """Parsed as the script parses it (flags, choices, ranges), also with --smoke's shortening."""
    script = import_module(argv[0].removesuffix(".py"))
    args = script.parse_args(argv[1:] + exercises.SMOKE[argv[0]] + ["--n-eval-images", "8"])
    assert (args.concept, args.seed) == (exercises.flag(argv, "--concept"), int(exercises.flag(argv, "--seed")))


@pytest.mark.slow(6)
@pytest.mark.parametrize("probe", PROBES)
def test_every_probe_flag_the_exercises_use_is_in_its_help(probe):
    r = subprocess.run([sys.executable, probe, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    used = [a for _, _, argv in RUNS if argv[0] == probe for a in argv[1:]] + exercises.SMOKE[probe]
    assert [f for f in used if f.startswith("--") and f not in r.stdout] == []
