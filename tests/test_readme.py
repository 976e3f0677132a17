"""The README's commands are run here, so the README cannot drift from the code."""

import json
import subprocess
import sys

import pytest

import eval as evaluation
from conftest import ROOT, readme_blocks, readme_quick_start


def test_quick_start_is_two_commands_and_the_second_is_what_ci_runs():
    install_and_run, install_and_test = readme_quick_start()
    assert install_and_run.startswith("pip install -r requirements.txt && python ")
    ci = (ROOT / ".ci" / "run").read_text()
    install, test = install_and_test.split(" && ")
    assert install == "pip install -r requirements.txt" and "pip install -q -r requirements.txt" in ci
    assert test in ci


@pytest.mark.slow(213)
def test_quick_start_saves_the_run_the_readme_describes(quick_start):
    # "the run is saved under outputs/pure-circle/ (unet/, run.json, metrics.json, before_after.png)"
    out = quick_start / "outputs" / "pure-circle"
    assert {"unet", "run.json", "metrics.json", "before_after.png"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "metrics.json").read_text())["concept"] == "circle"


@pytest.mark.slow(16)
def test_load_in_diffusers_snippet_runs_on_the_quick_start_output(quick_start):
    snippet = next(b for b in readme_blocks("python") if "UNet2DConditionModel.from_pretrained" in b)
    check = "\nassert image.size == (32, 32), image.size\nprint('ok')\n"
    r = subprocess.run([sys.executable, "-c", snippet + check], cwd=quick_start, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_the_bars_the_readme_states_are_the_tables_the_tests_and_the_benchmark_use():
    drop = {m: round(100 * evaluation.BAR_RETAIN_DROP[m]) for m in evaluation.METHODS}
    assert drop["pure"] == drop["vdu"] and drop["rl_critic"] == drop["esd"] == drop["salun"] == drop["fmn"]
    sentence = (f"UA >= {evaluation.BAR_UA:.0%} with in-domain retain at most {drop['pure']} (PURE, VDU), "
                f"{drop['mim_mu']} (MiM-MU) or {drop['rl_critic']} (CGRU, ESD, SalUn, FMN) "
                "points below the base")
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert sentence in readme
    common = evaluation.COMMON_BAR
    assert common["retain_in_drop"] == common["retain_cross_drop"]
    assert (f"Common bar: UA >= {common['ua']:.0%}, in-domain and cross-domain retain at most "
            f"{100 * common['retain_in_drop']:.0f} points below the base") in readme


def markdown_table(text: str, heading: str) -> dict[str, list[str]]:
    """The table under the first heading that starts with `heading`: method -> its cells."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_the_readme_table_is_the_headline_of_the_benchmark_report():
    # README: method | UA | drop | worst drop | cross drop | KID-CLIP | ASR | common bar, copied from
    # docs/results/results.md, whose headline table comes first; ASR from the development seeds
    readme = (ROOT / "README.md").read_text()
    results = (ROOT / "docs" / "results" / "results.md").read_text()
    headline = markdown_table(results, "## Per method (")
    dev = markdown_table(results, "## Per method (development seeds 0-2")
    mean = lambda cell: cell.split(" [")[0]
    table = markdown_table(readme, "| method | UA (%)")
    labels = [m["label"] for m in evaluation.METHODS.values()]
    assert list(table) == labels
    for name in labels:
        r, d = headline[name], dev[name]
        assert table[name] == [r[1], r[3], mean(r[4]), mean(r[5]), mean(r[8]), mean(d[12]), r[14]], name
    seeds = results[results.index("## Per method (") + 15:].split(")")[0].split(",")[0].split()[-1]
    assert f"10 concepts x seeds {seeds}" in " ".join(readme.split()), seeds  # e.g. "3-5"


def test_the_readme_is_a_ten_minute_read_and_points_nowhere_outside_the_repository():
    text = (ROOT / "README.md").read_text()
    assert len(text.split()) <= 1800, len(text.split())  # words, as `wc -w` counts them
    assert max(len(line) for line in text.splitlines()) <= 100
    import re
    for link in re.findall(r"\]\(([^)#]+)", text):
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link


def test_the_sdxl_line_parses_for_the_lora_methods_is_what_was_measured_and_the_others_refuse_it():
    import importlib
    import re

    import common
    from benchmarks.sd_memory import MODULES
    bash = "\n".join(readme_blocks("bash")).replace("\\\n", " ")
    line = re.search(r"^python pure\.py --model (?P<model>\S+) --concept church (?P<flags>[^#\n]*?)\s+# SDXL, "
                     r"(?P<card>\d+) GB", bash, re.M)
    assert line and line["model"] == "stabilityai/stable-diffusion-xl-base-1.0" and line["card"] == "24"
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "per-method flags in the memory doc (VDU needs 40 GB)" in readme
    for method, module in MODULES.items():
        mod = importlib.import_module(module)
        argv = ["--model", line["model"], "--concept", "church", *line["flags"].split()]
        if method in ("vdu", "salun"):
            with pytest.raises(common.UsageError, match="does not train LoRA adapters"):
                mod.parse_args(argv)
            continue
        recipe = mod.parse_args(argv)  # nothing loads
        path = ROOT / "benchmarks" / "records" / "sd_memory" / f"sdxl-{method}.json"
        if not path.exists():  # composed from the probe (docs/lab/sd_memory.md, "SDXL")
            assert method in ("mim_mu", "rl_critic", "fmn"), path
            continue
        rec = json.loads(path.read_text())
        ran = mod.parse_args(rec["argv"])
        shortened = {"model", "output_dir", "overwrite", "device", "n_eval_images", "steps", "sample_steps",
                     "n_forget", "n_retain"}  # where it ran, and the run shortened for the measurement
        for key, value in vars(recipe).items():
            if key not in shortened:
                assert getattr(ran, key) == value, (method, key)
        assert rec["method"] == method and rec["peak_tensor_gib"] <= 22, rec


def readme_memory_recipes() -> dict[str, list[str]]:
    """The README's Stable Diffusion lines tagged with a card size: {"16": flags, "24": flags}
    (a line continued with a backslash is one command)."""
    import re
    bash = "\n".join(readme_blocks("bash")).replace("\\\n", " ")
    return {m["card"]: m["flags"].split() for m in re.finditer(
        r"^python pure\.py --concept church (?P<flags>[^#\n]*?)\s+# (?P<card>\d+) GB", bash, re.M)}


def recipe_for(method: str, card: str, flags: list[str]) -> list[str]:
    """The README's exception: on 24 GB VDU adds --train xattn."""
    return flags + (["--train", "xattn"] if (method, card) == ("vdu", "24") else [])


def test_the_memory_recipes_parse_for_every_method_and_are_the_flags_that_were_measured():
    import importlib

    from benchmarks.sd_memory import MODULES  # the six scripts sd_memory.py measures, by name
    recipes = readme_memory_recipes()
    assert set(recipes) == {"16", "24"}, recipes
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "VDU adds `--train xattn`" in readme
    for method, module in MODULES.items():
        mod = importlib.import_module(module)
        for card, flags in recipes.items():
            recipe = mod.parse_args(["--concept", "church", *recipe_for(method, card, flags)])  # nothing loads
            path = ROOT / "benchmarks" / "records" / "sd_memory" / f"{card}gb-{method}.json"
            if not path.exists():  # composed from measured parts, not run (docs/lab/sd_memory.md says how)
                assert (card == "24" and method in ("pure", "esd", "salun", "fmn")) or (card, method) == ("16", "fmn"), path
                continue
            # measured with the recipe's flags, bf16 standing in for fp16 on the CPU (two bytes
            # a value either way), and within the card's budget: 14 GiB of 16, 22 of 24
            rec = json.loads(path.read_text())
            ran = mod.parse_args(rec["argv"])
            for key in ("train", "gradient_checkpointing", "sample_batch_size"):
                assert getattr(ran, key, None) == getattr(recipe, key, None), (method, card, key)
            assert {"fp16": "bf16"}.get(recipe.mixed_precision, recipe.mixed_precision) == ran.mixed_precision
            assert rec["method"] == method and rec["peak_tensor_gib"] <= {"16": 14, "24": 22}[card], rec
