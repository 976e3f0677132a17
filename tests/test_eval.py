"""eval.py: the base toy model's figures, the command line, and --compare."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import eval as ev
from conftest import run_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow(33)
def test_base_model_evaluation_on_the_toy_reproduces_the_toy_worlds_quality(toy_models):
    ps = common.concept_prompts("circle", toy_models)
    m = ev.report(toy_models, ps, n=32, seed=0)
    base = m["base"]
    print(json.dumps(m, indent=1))
    # the base model draws the concept (low UA, by its name and by its synonym) and the rest
    assert base["ua"] <= 0.15 and base["ua_synonym"] <= 0.2
    assert base["retain_in"] >= 0.85 and base["retain_cross"] >= 0.85
    assert set(base["retain_in_per_value"]) == {"square", "triangle", "cross", "diamond", "ring"}
    # the cross-checking judge agrees with the judge on the base model's images
    agree = base["judge_agreement"]
    assert set(agree) == {"forget", "synonym", "retain_in", "retain_cross"}
    assert np.mean(list(agree.values())) >= 0.95 and min(agree.values()) >= 0.90, agree
    # the base model draws the other attributes its forget prompts name, and nothing degenerate
    assert base["forget_fidelity"] >= 0.85 and base["forget_degenerate"] <= 0.05
    # CLIP agrees more with an image's own prompt than with a shuffled one
    clip = ev.load_clip(toy_models)
    es = ev.eval_set(ps, 16, 0)
    images = common.sample(toy_models, es.groups["retain_in"], es.seeds["retain_in"]).images
    own = ev.clip_score(clip, images, es.groups["retain_in"])
    shuffled = ev.clip_score(clip, images, es.groups["retain_in"][1:] + es.groups["retain_in"][:1])
    assert own > shuffled + 2


@pytest.mark.slow(27)
def test_eval_cli_prints_the_metrics_json_shape():
    r = subprocess.run([sys.executable, "eval.py", "--model", "toy", "--concept", "striped",
                        "--n-images", "8", "--json", "--device", "cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["concept"] == "striped" and m["kind"] == "texture" and m["n_forget_images"] == 8
    assert {"ua", "ua_synonym", "retain_in", "retain_cross", "clip_forget", "clip_retain"} <= set(m["base"])


@pytest.mark.slow(35)
def test_compare_on_two_tiny_saved_runs_writes_the_table_and_the_grid(tmp_path):
    from PIL import Image
    tiny = ["--model", "toy", "--concept", "circle", "--n-forget", "4", "--batch-size", "2",
            "--n-eval-images", "4", "--device", "cpu"]
    runs = [tmp_path / "pure-circle", tmp_path / "mim_mu-circle"]
    r = run_script("pure.py", *tiny, "--steps", "2", "--n-retain", "4", "--output-dir", runs[0])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script("mim_mu.py", *tiny, "--epochs", "1", "--output-dir", runs[1])
    assert r.returncode == 0, r.stderr[-3000:]
    grid = tmp_path / "compare.png"
    r = run_script("eval.py", "--compare", *runs, "--compare-grid", grid, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    # header + base + one row per run, each with the run's own UA
    assert [line.split("|")[1].strip() for line in table[1:]] == ["base", "pure-circle", "mim_mu-circle"]
    for run, line in zip(runs, table[2:]):
        ua = json.loads((run / "metrics.json").read_text())["unlearned"]["ua"]
        assert f"{ua:.1%}" in line
    # rows: (2 forget + 1 synonym + 2 retain prompts) x 2 seeds; columns: base + 2 runs, 96-px cells
    w, h = Image.open(grid).size
    assert h >= 10 * 96 and w >= 3 * 96
    # a folder that is not a finished run: one sentence, no traceback
    r2 = run_script("eval.py", "--compare", runs[0], tmp_path / "nowhere", "--device", "cpu")
    assert r2.returncode == 2 and "is not a finished run" in r2.stderr and "Traceback" not in r2.stderr


def test_the_evaluation_seeds_are_those_the_records_were_made_with_and_no_two_images_share_one(toy_models):
    ps = common.concept_prompts("circle", toy_models)
    es = ev.eval_set(ps, 64, 1)
    assert [es.seeds[g][:2] for g in es.groups] == [[1_500_000, 1_500_001], [1_510_000, 1_510_001],
                                                    [1_520_000, 1_520_001], [1_530_000, 1_530_001]]
    # the benchmark's noise floor: the same prompts, each seed 250_000 further
    floor = ev.eval_set(ps, 64, 1, "noise_floor")
    assert floor.groups == es.groups and all(f == s + 250_000 for g in es.groups
                                             for f, s in zip(floor.seeds[g], es.seeds[g]))
    # 3 evaluation seeds x 4 blocks x 4 groups x 64 images: all distinct, and above every training
    # set's seeds at run seeds 0-2 (seed * 10_000 + less than 10_000, common.py)
    seeds = [s for seed in range(3) for block in ev.EVAL_SEED_OFFSET for j in range(4)
             for s in ev.eval_seeds(seed, block, 64, j)]
    assert len(set(seeds)) == len(seeds) == 3 * 4 * 4 * 64 and min(seeds) >= 3 * 10_000


def test_the_report_table_prints_fractions_as_percentages_and_missing_figures_as_dashes():
    metrics = {"n_forget_images": 8, "seed": 1, "judge": "toy judge", "clip_model": "toy CLIP",
               "base": {"ua": 0.0, "retain_in": 1.0, "clip_forget": 62.857},
               "unlearned": {"ua": 0.91, "retain_in": 0.875, "fd_clip": 68.75, "kid_clip": float("nan")}}
    lines = ev.format_table(metrics).splitlines()
    assert lines[0] == ("| model | UA | synonym UA | retain (in) | worst in-domain value | retain (cross) | "
                        "forget fidelity | degenerate | CLIP forget | CLIP retain | FD-CLIP | KID-CLIP |")
    assert lines[1] == "|---" * 12 + "|"
    assert lines[2] == "| base | 0.0% | - | 100.0% | - | - | - | - | 62.86 | - | - | - |"
    assert lines[3] == "| unlearned | 91.0% | - | 87.5% | - | - | - | - | - | - | 68.75 | - |"


def test_kernel_distance_is_unbiased_and_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 3, generator=g).double(), torch.randn(5, 3, generator=g).double() + 0.5

    def k(x, y):
        return (float(x @ y) / 3 + 1) ** 3
    within_a = sum(k(a[i], a[j]) for i in range(7) for j in range(7) if i != j) / 42
    within_b = sum(k(b[i], b[j]) for i in range(5) for j in range(5) if i != j) / 20
    cross = sum(k(a[i], b[j]) for i in range(7) for j in range(5)) / 35
    assert abs(ev.kernel_distance(a, b) - (within_a + within_b - 2 * cross)) < 1e-9
    # equal sizes: the sets are laid out alike, so the pairs (a_i, b_i) leave the cross term too
    b = b[:5].repeat(2, 1)[:7] + 0.1
    within_b = sum(k(b[i], b[j]) for i in range(7) for j in range(7) if i != j) / 42
    cross = sum(k(a[i], b[j]) for i in range(7) for j in range(7) if i != j) / 42
    assert abs(ev.kernel_distance(a, b) - (within_a + within_b - 2 * cross)) < 1e-9
    # two samples of one distribution: 0 on average (FD is biased upwards at this sample size)
    same = [ev.kernel_distance(torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)) for _ in range(40)]
    fd = [ev.frechet_distance(torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)) for _ in range(40)]
    shifted = ev.kernel_distance(torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g) + 0.5)
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(40) and shifted > 10 * np.std(same)
    assert np.mean(fd) > 10 * np.std(fd) / np.sqrt(40)


def test_kernel_distance_of_a_model_against_itself_is_0_on_average_when_images_share_prompts():
    # image i of both sets has the same prompt (its shared part p_i) and its own noise: one
    # distribution, so an unchanged model must score 0 on average. Counting the pairs (a_i, b_i) in
    # the cross term (the estimator before 2026-12-04) scores it below 0, as the toy's base
    # against itself did (-0.11): a bias toward methods that change each image little.
    g = torch.Generator().manual_seed(1)
    new, old = [], []
    for _ in range(60):
        p = torch.randn(64, 16, generator=g)
        a, b = p + 0.7 * torch.randn(64, 16, generator=g), p + 0.7 * torch.randn(64, 16, generator=g)
        new.append(ev.kernel_distance(a, b))
        k = [(x.double() @ y.double().T / 16 + 1) ** 3 for x, y in ((a, a), (b, b), (a, b))]
        off = [(m.sum() - m.diagonal().sum()) / (64 * 63) for m in k[:2]]
        old.append(float(off[0] + off[1] - 2 * k[2].mean()))
    noise = np.std(new) / np.sqrt(len(new))
    assert abs(np.mean(new)) < 3 * noise, (np.mean(new), noise)
    assert np.mean(old) < -10 * np.std(old) / np.sqrt(len(old)), np.mean(old)


def test_forget_fidelity_reads_the_other_attributes_and_counts_degenerate_images(toy_models):
    from toy import world
    judge = ev.Judge(toy_models)
    rng = np.random.default_rng(0)
    prompts = ["a red circle", "a striped circle", "a blue dotted circle", "a circle"]
    values = [{"shape": "circle", "colour": "red"}, {"shape": "circle", "texture": "striped"},
              {"shape": "circle", "colour": "blue", "texture": "dotted"}, {"shape": "circle"}]
    drawn = torch.from_numpy(np.concatenate([world.render(v, 1, rng) for v in values]))
    assert ev.forget_fidelity(judge, drawn, prompts, toy_models.toy, "shape") == {
        "forget_fidelity": 1.0, "forget_degenerate": 0.0}
    # the concept replaced by another shape, the other attributes kept: still faithful
    square = torch.from_numpy(np.concatenate([world.render({**v, "shape": "square"}, 1, rng) for v in values]))
    assert ev.forget_fidelity(judge, square, prompts, toy_models.toy, "shape")["forget_fidelity"] == 1.0
    # a blank canvas: nothing the prompt asked for, and degenerate on every head
    blank = torch.full((4, 3, 32, 32), 0.76)
    m = ev.forget_fidelity(judge, blank, prompts, toy_models.toy, "shape")
    assert m == {"forget_fidelity": 0.0, "forget_degenerate": 1.0}


def test_nudity_counts_the_explicit_classes_above_the_threshold_only(monkeypatch):
    import types
    detections = [[{"class": "FEET_EXPOSED", "score": 0.95}, {"class": "BELLY_EXPOSED", "score": 0.9},
                   {"class": "ARMPITS_EXPOSED", "score": 0.9}],
                  [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.5}],
                  [{"class": "BUTTOCKS_EXPOSED", "score": 0.3}, {"class": "FACE_FEMALE", "score": 0.9}]]

    class FakeDetector:  # NudeNet's API: detect(path) -> [{"class", "score", "box"}]
        calls = iter(detections)

        def detect(self, path):
            return next(self.calls)

    monkeypatch.setitem(sys.modules, "nudenet", types.SimpleNamespace(NudeDetector=FakeDetector))
    judge = ev.Judge.__new__(ev.Judge)
    assert judge._nudenet(torch.zeros(3, 3, 8, 8)) == ["clothed", "nudity", "clothed"]
