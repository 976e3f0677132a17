"""benchmarks/compare_toy.py: its statistics, its claims' verdicts, and that --report-only rebuilds
the docs from records alone, byte for byte."""

import json
from pathlib import Path

import numpy as np
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import compare_toy  # noqa: E402
import eval as evaluation  # noqa: E402


@pytest.mark.parametrize("n,t", [(2, 12.706), (3, 4.303), (4, 3.182), (6, 2.571), (10, 2.262), (30, 2.045)])
def test_the_interval_is_the_t_interval_of_the_table(n, t):
    values = [float(i % 2) for i in range(n)]  # sd known in closed form
    mean, low, high = compare_toy.interval(values)
    assert abs((high - mean) / (np.std(values, ddof=1) / np.sqrt(n)) - t) < 0.001


def test_intervals_are_over_concepts_with_the_seeds_of_a_concept_averaged_first():
    units = {("circle", 0): 10.0, ("circle", 1): 12.0, ("circle", 2): 14.0, ("square", 0): 0.0, ("square", 1): 2.0,
             ("triangle", 0): 5.0}
    assert compare_toy.concept_means(units) == [12.0, 1.0, 5.0]
    assert compare_toy.concept_interval(units) == compare_toy.interval([12.0, 1.0, 5.0])
    # three correlated seeds are not three units: over runs this difference "holds", over concepts not
    recs = {}
    for i, c in enumerate(("circle", "square", "triangle")):
        for s in (0, 1, 2):
            recs[("pure", c, s)] = _record("pure", c, s, ua=0.90, retain_in=0.9)
            recs[("esd", c, s)] = _record("esd", c, s, ua=0.90 - [0.10, 0.06, -0.01][i] - 0.001 * s, retain_in=0.9)
    by_runs = compare_toy.interval([100 * (recs[("pure", c, s)]["unlearned"]["ua"] - recs[("esd", c, s)]["unlearned"]["ua"])
                                    for c in ("circle", "square", "triangle") for s in (0, 1, 2)])
    assert by_runs[1] > 0  # nine runs taken as independent: "holds"
    claim = compare_toy.check_claim(recs, ("PURE", "", "ua", "pure", "esd", +1))
    assert claim["n"] == 3 and claim["n_units"] == 9 and claim["verdict"] == "inconclusive"  # 3 concepts decide


def _record(method, concept, seed, ua, retain_in, base_retain=0.95, kid=1.0):
    values = {"square": retain_in - 0.1, "triangle": retain_in + 0.05}
    m = {"ua": ua, "ua_synonym": ua, "retain_in": retain_in, "retain_cross": 0.9, "retain_in_per_value": values,
         "retain_in_worst": min(values.values()), "retain_in_worst_value": min(values, key=values.get),
         "forget_fidelity": 0.5, "forget_degenerate": 0.1, "fd_clip": 10.0, "kid_clip": kid,
         "clip_forget": 20.0, "clip_retain": 50.0}
    base = {**m, "ua": 0.02, "retain_in": base_retain, "retain_in_per_value": {"square": 0.95, "triangle": 0.95}}
    return {"method": method, "concept": concept, "seed": seed, "wall_time_s": 60.0, "base": base, "unlearned": m}


def test_a_claim_holds_fails_or_is_inconclusive_by_its_paired_interval():
    recs = {}
    concepts = ("circle", "square", "triangle", "cross", "ring", "solid")
    for i, (c, s) in enumerate([(c, s) for c in concepts for s in (0, 1, 2)]):
        recs[("pure", c, s)] = _record("pure", c, s, ua=0.99 - 0.002 * i, retain_in=0.93)
        recs[("esd", c, s)] = _record("esd", c, s, ua=0.80 + 0.002 * i, retain_in=0.93 + (0.02 if i % 2 else -0.02))
    ua = compare_toy.check_claim(recs, ("PURE", "", "ua", "pure", "esd", +1))
    assert ua["verdict"] == "holds" and ua["n"] == 6 and ua["low"] > 0
    assert compare_toy.check_claim(recs, ("PURE", "", "ua", "pure", "esd", -1))["verdict"] == "fails"
    assert compare_toy.check_claim(recs, ("PURE", "", "retain_in_drop", "pure", "esd", -1))["verdict"] == "inconclusive"
    assert compare_toy.check_claim(recs, ("PURE", "", "ua", "pure", "salun", +1))["verdict"] == "not measured yet"
    # against a stated figure: PURE's UA (95.6-99%) is above 90% on every unit, not above 97% on all
    assert compare_toy.check_claim(recs, ("PURE", "", "ua", "pure", 90.0, +1))["verdict"] == "holds"
    assert compare_toy.check_claim(recs, ("PURE", "", "ua", "pure", 97.0, +1))["verdict"] == "inconclusive"
    # a quality claim is made only where both sides forget: ESD forgets on none of these units
    kid = compare_toy.check_claim(recs, ("PURE", "", "kid_clip", "pure", "esd", -1, "", True))
    assert kid["verdict"].startswith("not testable") and kid["unmatched"] is not None


def test_a_steadiness_claim_compares_each_concepts_spread_over_its_seeds():
    recs = {}
    for i, c in enumerate(("circle", "square", "triangle", "cross")):
        for s in (3, 4, 5):  # the critic's UA moves 1 point between seeds, the terminal reward's 20
            recs[("rl_critic", c, s)] = _record("rl_critic", c, s, ua=0.90 + 0.01 * s + 0.001 * i, retain_in=0.9)
            recs[("rl_critic_terminal", c, s)] = _record("rl_critic_terminal", c, s, ua=0.40 + 0.2 * (s - 3) - 0.01 * i,
                                                         retain_in=0.9)
    claim = compare_toy.check_claim(recs, ("CGRU", "", "ua_spread", "rl_critic", "rl_critic_terminal", -1))
    assert claim["n"] == 4 and claim["mean"] == pytest.approx(1.0 - 20.0) and claim["verdict"] == "holds"
    # the other way round, the claim fails
    assert compare_toy.check_claim(recs, ("CGRU", "", "ua_spread", "rl_critic_terminal", "rl_critic", -1))[
        "verdict"] == "fails"


def test_comparable_means_within_5_points_on_the_claimed_side_and_lora_stands_beside_full_weights():
    recs = {}
    for i, (c, s) in enumerate([(c, s) for c in ("circle", "square", "triangle", "ring") for s in (0, 1)]):
        wobble = 0.01 if i % 2 else -0.01
        recs[("pure", c, s)] = _record("pure", c, s, ua=0.95, retain_in=0.90)
        # LoRA: 3 points less UA and 3 points more drop than full weights (within 5), or 8 (not)
        recs[("pure_lora", c, s)] = {**_record("pure_lora", c, s, ua=0.92 + wobble, retain_in=0.87 + wobble),
                                     "result_mb": 0.13}
        recs[("esd", c, s)] = _record("esd", c, s, ua=0.95, retain_in=0.90)
        recs[("esd_lora", c, s)] = _record("esd_lora", c, s, ua=0.87 + wobble, retain_in=0.82 + wobble)
    verdict = lambda *claim: compare_toy.check_claim(recs, ("LoRA", "", *claim))["verdict"]  # noqa: E731
    assert verdict("ua_comparable", "pure_lora", "pure", +1) == "holds"
    assert verdict("retain_in_drop_comparable", "pure_lora", "pure", -1) == "holds"
    assert verdict("ua_comparable", "esd_lora", "esd", +1) == "fails"
    assert verdict("retain_in_drop_comparable", "esd_lora", "esd", -1) == "fails"
    text = "\n".join(compare_toy.lora_section(recs))
    assert "| PURE `--train lora` | 92.0" in text and "| 0.13 | 4 x 2 |" in text
    assert text.count("| holds |") == 2 and text.count("| fails |") == 2


def test_holm_tests_the_i_th_smallest_p_value_at_alpha_over_m_minus_i_and_stops_at_the_first_miss():
    def claim(p, mean=1.0):
        return {"p": p, "mean": mean, "direction": +1, "verdict": "holds" if p < 0.05 else "inconclusive",
                "means": [mean + 0.1, mean - 0.1, mean]}
    results = [claim(0.03), claim(0.001), claim(0.02), claim(0.2), {"verdict": "not measured yet", "p": float("nan")}]
    compare_toy.holm(results)
    # m = 4: 0.001 <= 0.05/4 rejected; 0.02 > 0.05/3 stops; 0.03 and 0.2 then not rejected either
    assert [r["holm_verdict"] for r in results] == ["inconclusive", "holds", "inconclusive", "inconclusive",
                                                    "not measured yet"]
    assert "holm_low" not in results[4]
    fails = compare_toy.holm([{**claim(0.001, mean=-1.0)}])[0]
    assert fails["holm_verdict"] == "fails"
    # a claim whose differences are all 0 (both methods at UA 100% everywhere) has p = 1, not NaN:
    # it must not stop the step-down for the claims after it
    zero = {**claim(1.0, mean=0.0), "means": [0.0, 0.0, 0.0], "verdict": "inconclusive"}
    zero["p"] = compare_toy.p_value(zero["means"])
    results = compare_toy.holm([zero, claim(5e-6), claim(2e-5), claim(2e-4)])
    assert zero["p"] == 1.0 and [r["holm_verdict"] for r in results[1:]] == ["holds"] * 3


def test_figures_are_in_points_and_the_worst_value_drop_is_the_largest_drop_of_any_value():
    f = compare_toy.figures(_record("pure", "circle", 0, ua=0.9, retain_in=0.8))
    assert f["ua"] == pytest.approx(90) and f["retain_in_drop"] == pytest.approx(15)
    assert f["worst_drop"] == pytest.approx(95 - 70)  # square: 0.95 in the base, 0.70 unlearned
    # the value read worst after is not always the one that dropped most
    rec = _record("pure", "circle", 0, ua=0.9, retain_in=0.8)
    rec["base"]["retain_in_per_value"] = {"square": 0.60, "triangle": 1.0}
    rec["unlearned"]["retain_in_per_value"] = {"square": 0.55, "triangle": 0.70}
    assert compare_toy.figures(rec)["worst_drop"] == pytest.approx(30) and evaluation.worst_drop(rec)[0] == "triangle"


def test_the_headline_leaves_out_records_made_from_a_dirty_tree_and_kid_pairs_one_estimator():
    recs = {("pure", c, s): _record("pure", c, s, ua=0.99, retain_in=0.93) for c in ("circle", "square") for s in (0, 3)}
    for r in recs.values():
        r["commit"] = "abc1234"
    recs[("pure", "square", 3)]["commit"] = "abc1234+changes"
    assert set(compare_toy.seed_set(recs, compare_toy.TEST_SEEDS)) == {("pure", "circle", 3)}
    assert len(compare_toy.seed_set(recs, compare_toy.SEEDS)) == 2  # development records are kept, marked
    pair = {}
    for i, c in enumerate(("circle", "square", "triangle")):
        pair[("pure", c, 3)] = _record("pure", c, 3, ua=0.99, retain_in=0.93, kid=0.1 * i)
        pair[("esd", c, 3)] = _record("esd", c, 3, ua=0.99, retain_in=0.93, kid=0.5)
        pair[("pure", c, 3)]["kid_estimator"] = pair[("esd", c, 3)]["kid_estimator"] = "u-statistic"
    del pair[("esd", "triangle", 3)]["kid_estimator"]  # an earlier record: not paired with a new one
    kid = compare_toy.check_claim(pair, ("PURE", "", "kid_clip", "pure", "esd", -1))
    assert kid["n"] == 2 and kid["n_units"] == 2


def test_the_common_bar_sees_the_other_kind():
    rec = _record("esd", "dotted", 3, ua=0.95, retain_in=0.93)
    assert evaluation.meets_common_bar(rec) and evaluation.meets_bar("esd", rec)
    rec["unlearned"]["retain_cross"] = rec["base"]["retain_cross"] - 0.56  # the other shapes drop 56 points
    assert not evaluation.meets_common_bar(rec) and evaluation.meets_bar("esd", rec)


@pytest.mark.slow(7)
def test_report_only_rebuilds_the_committed_docs_byte_for_byte(tmp_path):
    """The committed docs/results/results.md, claims.md and tradeoff.png are what --report-only
    writes from the committed records."""
    r = subprocess.run([sys.executable, "benchmarks/compare_toy.py", "--report-only", "--docs", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("results.md", "claims.md", "tradeoff.png", "heatmap.png", "forest.png"):
        assert (tmp_path / name).read_bytes() == (ROOT / "docs" / "results" / name).read_bytes(), name


def test_every_record_names_its_command_commit_and_arguments():
    names = ["base", *evaluation.METHODS, *compare_toy.VARIANTS]  # the runs' folders (not sd_memory/, attack/)
    paths = sorted(p for name in names for p in (compare_toy.RECORDS / name).glob("*.json"))
    assert len(paths) >= 180 + 30  # the six methods' 180 runs and the base evaluations, at least
    for path in paths:
        rec = json.loads(path.read_text())
        assert rec["commit"] and rec["seed"] in (*compare_toy.SEEDS, *compare_toy.TEST_SEEDS), path
        if path.parent.name != "base":
            assert rec["command"].startswith("python ") and rec["args"]["seed"] == rec["seed"], path
        if rec["seed"] in compare_toy.TEST_SEEDS:  # the headline: traceable to the commit and the weights
            assert not rec["commit"].endswith("+changes") and rec["kid_estimator"] == compare_toy.KID_ESTIMATOR, path
            if path.parent.name != "base":
                assert len(rec["unet_sha256"]) == 64 and rec["argv"][0].endswith(".py"), path


def test_runs_are_sharded_without_overlap_and_a_dirty_tree_is_refused(monkeypatch):
    units = [(s, c) for s in (3, 4, 5) for c in compare_toy.CONCEPTS]
    slices = [compare_toy.shard(units, f"{k}/4") for k in range(1, 5)]
    assert sorted(u for part in slices for u in part) == sorted(units) and max(map(len, slices)) == 8
    assert compare_toy.shard(units, None) == units
    with pytest.raises(SystemExit, match="K/N"):
        compare_toy.shard(units, "5/4")
    monkeypatch.setattr(compare_toy, "commit", lambda: "abc1234+changes")
    with pytest.raises(SystemExit, match="commit it first"):
        compare_toy.require_clean_tree(allow_dirty=False)
    compare_toy.require_clean_tree(allow_dirty=True)
    monkeypatch.setattr(compare_toy, "commit", lambda: "abc1234")
    compare_toy.require_clean_tree(allow_dirty=False)


def test_every_attack_record_names_its_budget_and_the_attack_brings_each_concept_back_from_the_base():
    import attack
    recs = [json.loads(p.read_text()) for p in sorted((compare_toy.ATTACKS).glob("*/*.json"))]
    assert recs
    for rec in recs:
        assert rec["commit"] and rec["n_eval_images"] == 64 and rec["command"]
        seeds = attack.eval_seeds(rec["seed"], 64)
        assert rec["eval_seeds"] == [seeds[0], seeds[-1]]  # judged on the seeds the protocol gives today
        assert {k: rec["budget"][k] for k in ("steps", "lr", "batch_size", "n_images", "init_word")} == \
            {k: attack.TOY_DEFAULTS[k] for k in ("steps", "lr", "batch_size", "n_images", "init_word")}
    controls = [r for r in recs if r["method"] == "base"]
    # the attack works on every concept at seed 0 (measured 2026-12-01: 91% (cross, solid) to 100%)
    assert sorted(r["concept"] for r in controls if r["seed"] == 0) == sorted(compare_toy.CONCEPTS)
    assert min(r["asr"] for r in controls if r["seed"] == 0) >= compare_toy.CONTROL_BAR
    # where a control falls below the bar (dotted at seed 1: 79.7%, measured 2026-12-02), no
    # method's ASR on that unit reaches the tables; everywhere else every attacked run's does
    failed = {(r["concept"], r["seed"]) for r in compare_toy.failed_controls()}
    assert failed == {(r["concept"], r["seed"]) for r in controls if r["asr"] < compare_toy.CONTROL_BAR}
    attacked = {(p.parent.name, p.stem) for p in compare_toy.ATTACKS.glob("*/*.json") if p.parent.name != "base"}
    for (name, concept, seed), rec in compare_toy.load_records().items():
        was_attacked = (name, f"{concept}-seed{seed}") in attacked
        assert ("attack" in rec) == (was_attacked and (concept, seed) not in failed), (name, concept, seed)


def test_every_benchmark_record_ran_what_its_command_line_gives_today():
    # The records are the evidence that each method's defaults forget (30 runs, 3 seeds; the
    # end-to-end tests run one concept and seed, some of them shortened to fit the suite's time).
    # A default changed after its records were made must fail here, not pass silently.
    import importlib
    not_compared = {"output_dir", "overwrite", "n_eval_images", "device"}  # where and whether to evaluate
    newer = {"t_min": 0, "sample_batch_size": None, "save_half": False,   # added later; these defaults ran before
             "grad_accumulation": 1, "advantages": "critic"}
    for name in [*evaluation.METHODS, *compare_toy.VARIANTS]:
        method, extra = compare_toy.VARIANTS.get(name, (name, []))
        script = evaluation.METHODS[method]["script"]
        module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
        for path in sorted((compare_toy.RECORDS / name).glob("*.json")):
            rec = json.loads(path.read_text())
            now = vars(module.parse_args(["--model", "toy", "--concept", rec["concept"], "--seed", str(rec["seed"]),
                                          *extra]))
            if "checkpoints" in now:   # the same snapshots, wherever the repository was
                now["checkpoints"] = [Path(c).name for c in now["checkpoints"]]
                rec["args"]["checkpoints"] = [Path(c).name for c in rec["args"]["checkpoints"]]
            # LoRA's flags came later and act only with --train lora; MiM-MU's --train (cross-attention
            # or lora) came with them, and before them it trained cross-attention
            ran_before = {**newer, "lora_rank": 4, "lora_on": now.get("lora_on"), "train": "xattn"}
            for key, value in now.items():
                if key not in not_compared:
                    assert rec["args"].get(key, ran_before.get(key, "missing")) == value, (path, key)


def test_every_variant_is_a_command_line_its_method_accepts():
    import importlib
    for name, (method, extra) in compare_toy.VARIANTS.items():
        script = evaluation.METHODS[method]["script"]
        module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
        args = module.parse_args(["--model", "toy", "--concept", "circle", *extra])
        assert args.concept == "circle", name
    assert compare_toy.VARIANTS["vdu_2_snapshots"][1][-2:] == ["toy/snapshots/unet-1", "toy/snapshots/unet-2"]
    assert all((compare_toy.ROOT / p).is_dir() for p in compare_toy.VARIANTS["vdu_2_snapshots"][1][-2:])


def test_the_vdu_search_chooses_by_its_stated_rule_and_its_candidates_are_command_lines():
    sys.path.insert(0, str(ROOT / "benchmarks" / "probes"))
    import vdu
    import vdu_search

    for key, (name, extra) in vdu_search.CANDIDATES.items():
        if extra is not None:
            assert vdu.parse_args(["--model", "toy", "--concept", "circle", *extra]).concept == "circle", key

    def s(runs, ua, drop, meets):
        return {"runs": runs, "ua": (ua, 0, 0), "drop": (drop, 0, 0), "meets": meets}
    # only candidates with 10 concepts x 3 seeds count; among those keeping the drop <= 10, the highest UA
    assert vdu_search.choose({"a": s(10, 99, 0, 10)}) == (None, False)
    assert vdu_search.choose({"a": s(30, 80, 5, 12), "b": s(30, 92, 9, 20), "c": s(30, 99, 20, 25)}) == ("b", True)
    assert vdu_search.choose({"a": s(30, 80, 5, 12), "c": s(30, 99, 20, 25)}) == ("a", False)
    # none keeps the drop: most runs meeting the bar, ties to the smaller drop; never "reached"
    assert vdu_search.choose({"c": s(30, 99, 20, 9), "d": s(30, 95, 15, 9)}) == ("d", False)


def test_every_vdu_candidate_record_ran_what_its_command_line_gives_today_and_the_default_is_the_choice():
    # a default can change after its records were made: a candidate's arguments must
    # still reproduce what its records ran, and the search's choice must be what vdu.py runs by default
    sys.path.insert(0, str(ROOT / "benchmarks" / "probes"))
    import vdu
    import vdu_search

    vdu_search.register()
    keys = ("precision_from", "gamma", "ascent_bound", "steps", "lr", "t_min")
    recs = vdu_search.records()
    for key, (name, extra) in vdu_search.CANDIDATES.items():
        extra = compare_toy.VARIANTS.get(name, ("vdu", []))[1] if extra is None else extra
        now = vars(vdu.parse_args(["--model", "toy", "--concept", "circle", *extra]))
        now = {**{k: now[k] for k in keys}, "checkpoints": [Path(c).name for c in now["checkpoints"]]}
        for rec in recs[key].values():
            ran = {k: rec["args"].get(k, 0) for k in keys}   # t_min is newer than most records: 0 then
            ran["checkpoints"] = [Path(c).name for c in rec["args"]["checkpoints"]]
            assert ran == now, (key, rec["concept"], rec["seed"])
    best, _ = vdu_search.choose({k: vdu_search.summary(r) for k, r in recs.items()})
    assert best is not None and vdu_search.CANDIDATES[best][0] == "vdu", best


def test_the_held_out_seeds_judge_a_claim_only_once_both_sides_have_all_their_units():
    units = [(c, s) for c in compare_toy.CONCEPTS for s in compare_toy.TEST_SEEDS]
    recs = {}
    for name in ("pure", "esd"):
        for c, s in units + [(c, 0) for c in compare_toy.CONCEPTS]:
            recs[(name, c, s)] = {**_record(name, c, s, ua=0.9, retain_in=0.9), "commit": "abc1234"}
    claim = ("PURE", "", "ua", "pure", "esd", +1)
    assert compare_toy.claims_records(recs, claim)[1] == compare_toy.TEST_SEEDS
    del recs[("esd", "circle", 5)]  # one unit missing: the development seeds still judge it
    assert compare_toy.claims_records(recs, claim)[1] == compare_toy.SEEDS


def test_a_vdu_class_run_that_ran_away_is_listed_and_left_out_of_the_counts():
    import vdu_uncond
    rec = json.loads((vdu_uncond.RECORDS / "default" / "circle-seed3.json").read_text())
    ran_away = {"variant": "no_stability", "concept": "square", "seed": 3, "commit": "abc",
                "command": "python vdu.py --gamma 0", "failed": "the forget loss A ran away at step 181"}
    page = vdu_uncond.report({("default", "circle", 3): rec, ("no_stability", "square", 3): ran_away}, [3])
    assert "- `no_stability` square seed 3: the forget loss A ran away at step 181" in page
    assert "| `no_stability`: gradient ascent with the same bound, no stability term (gamma 0) | 0 |" in page
    assert "| `default`: VDU's toy defaults (Fisher precision, gamma 0.35, bound 3) | 1 (1) |" in page
