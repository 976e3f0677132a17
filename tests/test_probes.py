"""benchmarks/probes/: each probe run once with its smallest arguments on the toy, so that a probe
that reaches into a method's (or eval's) internals fails here the day those internals change."""

import importlib.util
import json
import re
import sys

import pytest

from conftest import ROOT, run_script

PROBES = ROOT / "benchmarks" / "probes"


@pytest.fixture()
def probe(monkeypatch):
    """Run a probe's main() in this process with a command line (what it prints: capsys). The
    entries it adds to sys.path are taken away after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))

    def run(name: str, *argv: str):
        monkeypatch.setattr(sys, "argv", [f"{name}.py", *map(str, argv)])
        spec = importlib.util.spec_from_file_location(f"probe_{name}", PROBES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main()
    return run


@pytest.fixture()
def toy_run(tmp_path, toy_models):
    """A saved toy run of circle whose UNet is the base model's own: what a probe of saved runs reads."""
    toy_models.unet.save_pretrained(tmp_path / "unet")
    (tmp_path / "run.json").write_text(json.dumps({"base_model": "toy", "args": {"concept": "circle", "seed": 0}}))
    (tmp_path / "metrics.json").write_text(json.dumps({"concept": "circle", "seed": 0}))
    return tmp_path


def table_rows(text: str) -> list[list[str]]:
    """The cells of the markdown table rows a probe printed (header and separator left out)."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    return rows[1:]


def test_text_entanglement_prints_a_cosine_per_neighbour(probe, capsys):
    probe("text_entanglement", "--concept", "circle")
    rows = table_rows(capsys.readouterr().out)
    # the five other shapes and the empty prompt, each a cosine in [-1, 1]
    assert [r[0] for r in rows] == ["'a square'", "'a triangle'", "'a cross'", "'a diamond'", "'a ring'", "''"]
    assert all(-1 <= float(c) <= 1 for r in rows for c in r[1:])


def test_exploration_by_guidance_prints_a_share_per_scale(probe, capsys):
    probe("exploration_by_guidance", "--concepts", "circle", "--guidance", "1", "3", "--n", "4", "--steps", "2")
    (row,) = table_rows(capsys.readouterr().out)
    assert row[0] == "circle" and all(0 <= float(c.rstrip("%")) <= 100 for c in row[1:])


@pytest.mark.slow(5)
def test_attack_budget_learns_and_judges_with_attack_py(probe, capsys):
    # attack.Args, TOY_DEFAULTS, eval_seeds, template, make_data, learn_embedding, success_rate
    probe("attack_budget", "--concepts", "circle", "--steps", "2", "--every", "2", "--n-images", "4")
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["concept"] == "circle" and 0 <= out["asr_base_by_step"]["2"] <= 1
    assert out["nearest_words"][0][0] == "shape"  # two small steps leave v next to its init word


@pytest.mark.slow(11)
def test_salun_retain_drift_trains_salun_with_one_term(probe, capsys, monkeypatch):
    # salun.parse_args, setup, make_data, saliency_mask, loss (replaced by the probe), train
    sys.path.insert(0, str(ROOT / "baselines"))
    import salun
    monkeypatch.setattr(salun, "loss", salun.loss)  # the probe replaces it: put it back after
    probe("salun_retain_drift", "--steps", "1", "--n-forget", "4", "--n-retain", "4", "--n-images", "2",
          "--prompts", "a cross")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    counts = [int(n) for n in re.findall(r"', (\d+)\)", line)]
    assert line.startswith("'a cross': base [") and "after training retain only [" in line
    assert len(counts) >= 2 and sum(counts) == 2 * 2  # two images judged before and after


@pytest.mark.slow(8)
def test_judge_agreement_reports_the_same_agreement_for_the_same_weights(probe, toy_run, tmp_path):
    # eval.report on a saved run
    probe("judge_agreement", toy_run, "--n-images", "2", "--json", tmp_path / "agree.json")
    agree = json.loads((tmp_path / "agree.json").read_text())[str(toy_run)]
    assert set(agree["base"]) == {"forget", "synonym", "retain_in", "retain_cross"}
    assert agree["unlearned"] == agree["base"]  # the run's UNet is the base model's


@pytest.mark.slow(17)
def test_guidance_branch_damage_evaluates_the_four_branch_pairs(probe, toy_run, capsys):
    # eval.eval_set and eval.evaluate, with a UNet that mixes two UNets' guidance branches
    probe("guidance_branch_damage", "--run", toy_run, "--n", "2")
    rows = table_rows(capsys.readouterr().out)
    assert [r[:2] for r in rows] == [["base", "base"], ["trained", "trained"], ["base", "trained"],
                                     ["trained", "base"]]
    assert rows[0][2:] == rows[1][2:]  # the same weights through the same call: the same figures


@pytest.mark.slow(31)
def test_critic_input_ablation_fits_the_three_critics(probe, capsys):
    # rl_critic.parse_args, setup, rollouts, rewards, state_features, Critic, critic_rows, fit_critic
    probe("critic_input_ablation", "--train-rollouts", "1", "--epochs", "1")
    rows = table_rows(capsys.readouterr().out)
    assert [r[0] for r in rows] == ["x_t + FiLM (default)", "x_t, no FiLM (--no-timestep)",
                                    "x0_hat + FiLM (--critic-input x0_hat)"]


@pytest.mark.slow(7)
def test_gradient_agreement_by_step_compares_two_batches(probe, capsys):
    # rl_critic.parse_args, setup, rollouts, rewards
    probe("gradient_agreement_by_step", "--trajectories", "2", "--batches", "2")
    rows = table_rows(capsys.readouterr().out)
    assert [r[0] for r in rows] == ["all steps", "noisiest half", "least noisy half", "last step only"]


@pytest.mark.slow(6)
def test_kid_bias_compares_the_two_estimators_on_the_base_model(probe, capsys):
    # eval.eval_set, eval.kernel_distance, the seed blocks "eval" and "noise_floor"
    probe("kid_bias", "--concepts", "circle", "--seeds", "0", "--n-images", "4")
    rows = table_rows(capsys.readouterr().out)
    assert [r[:2] for r in rows] == [["circle", "0"], ["mean (95%)", "1 units"]]
    assert all(float(c) == float(c) for c in rows[0][2:])  # two finite figures


@pytest.mark.slow(25)
def test_the_gpu_check_replays_memory_records_on_another_model_and_device(tiny_sd, tiny_sdxl, tmp_path):
    # the script a GPU session runs, end to end on the CPU: an SD v1.4 record and an SDXL one,
    # each pointed at a tiny pipeline, in its own process, into one JSON
    out = tmp_path / "gpu.json"
    r = run_script("benchmarks/gpu_check.py", "--records", "24gb-vdu", "sdxl-esd", "--sd14", tiny_sd,
                   "--sdxl", tiny_sdxl, "--device", "cpu", "--out", tmp_path / "runs", "--json", out, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [run["record"] for run in runs] == ["24gb-vdu", "sdxl-esd"], runs
    for run in runs:
        assert "failed" not in run and run["train_s"] > 0 and run["train_units"] == 2, run
        assert str(tmp_path / "runs") in " ".join(run["argv"]) and "/tmp/sdmem" not in " ".join(run["argv"])
    assert runs[0]["cpu_estimate_gib"] == json.loads((ROOT / "benchmarks/records/sd_memory/24gb-vdu.json")
                                                     .read_text())["peak_tensor_gib"]


@pytest.mark.slow(40)
def test_unet_passes_counts_the_passes_of_a_run_at_its_sd_defaults(tiny_sd, tmp_path, capsys, monkeypatch):
    """FMN at SD defaults draws 10 forget images (50 guided DDIM steps: 100 image-passes each) and
    trains one image a step; PURE draws 50 forget and 50 retain images, and each burst of 4 forget
    steps (4 forget and 4 retain images through the trained UNet and the reference) and 1 repair
    step (4 retain images through each) costs 36 passes of each kind: 7.2 a step."""
    monkeypatch.setattr(sys, "argv", ["unet_passes.py", "--pipeline", str(tiny_sd), "--methods", "fmn", "pure",
                                      "--work", str(tmp_path)])
    spec = importlib.util.spec_from_file_location("probe_unet_passes", PROBES / "unet_passes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()
    out = capsys.readouterr().out
    rows = json.loads(out[out.index("\n{") + 1:])
    assert rows["fmn"]["fixed"] == {"no_grad": 1000, "grad": 0} and rows["fmn"]["per_step"] == {"no_grad": 0, "grad": 1}
    assert rows["pure"]["fixed"] == {"no_grad": 10000, "grad": 0}
    assert rows["pure"]["per_step"] == pytest.approx({"no_grad": 7.2, "grad": 7.2})
    assert rows["pure"]["at_sd_default"] == {"no_grad": 10720, "grad": 720}
