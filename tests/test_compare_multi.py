"""benchmarks/compare_multi.py: several concepts and sequences, from records to the page."""

import json

from benchmarks import compare_multi as cm


def fake_metrics(concepts, model, ua=0.95, earlier=None):
    report = lambda c: {"concept": c, "base": {"ua": 0.0, "retain_in": 0.9, "retain_cross": 0.9},  # noqa: E731
                        "unlearned": {"ua": ua, "retain_in": 0.85, "retain_cross": 0.8}}
    if len(concepts) > 1:
        return {"concept": " + ".join(concepts), "wall_time_s": 260.0, "eval_time_s": 60.0,
                "concepts": {c: report(c) for c in concepts}}
    return {**report(concepts[0]), "wall_time_s": 100.0, **({"earlier": earlier} if earlier else {})}


def test_sets_and_a_sequence_become_records_and_a_page_with_resurgence(tmp_path, monkeypatch):
    monkeypatch.setattr(cm, "RECORDS", tmp_path / "records")
    monkeypatch.setattr(cm, "WORK", tmp_path / "work")
    monkeypatch.setattr(cm, "DOC", tmp_path / "multi.md")
    monkeypatch.setattr(cm, "commit", lambda: "abc1234")
    monkeypatch.setattr(cm, "SINGLE", tmp_path / "single")
    (tmp_path / "single" / "mim_mu").mkdir(parents=True)
    for c, ua in (("circle", 0.8), ("striped", 0.97)):  # one-concept runs of 100 s: the pair took twice as long
        (tmp_path / "single" / "mim_mu" / f"{c}-seed3.json").write_text(json.dumps(
            {"train_time_s": 100.0, "base": {"retain_in": 0.9}, "unlearned": {"ua": ua, "retain_in": 0.88}}))
    stage_ua = {"circle": 0.97, "striped": 0.93, "square": 0.99}

    def train(method, model, concepts, seed, out):  # the method's report, without training
        if len(concepts) > 1:
            return fake_metrics(concepts, model), ["x.py"]
        i = cm.SEQUENCE.index(concepts[0])
        # circle falls back from 97 to 77 by the last stage (20 points), striped from 93 to 90
        now = {"circle": [0.97, 0.87, 0.77], "striped": [None, 0.93, 0.90]}
        earlier = {c: {"now": {"ua": now[c][i]}, "after_its_run": {"ua": stage_ua[c]}} for c in cm.SEQUENCE[:i]}
        return fake_metrics(concepts, model, stage_ua[concepts[0]], earlier), ["x.py", "--model", str(model)]
    monkeypatch.setattr(cm, "train", train)
    for concepts in cm.SETS:
        assert cm.run_set("mim_mu", concepts, 3)["train_time_s"] == 200.0
    rec = cm.run_sequence("mim_mu", 3)
    assert [s["concept"] for s in rec["stages"]] == cm.SEQUENCE
    assert cm.stage_uas(rec)[-1] == {"circle": 77.0, "striped": 90.0, "square": 99.0}
    assert abs(cm.resurgence(rec) - 20.0) < 1e-9
    assert json.loads((tmp_path / "records" / "mim_mu" / "circle-striped-seed3.json").read_text())["commit"] == "abc1234"
    assert cm.write_page()
    page = (tmp_path / "multi.md").read_text()
    assert "## Held-out seeds 3-5" in page and "Development seeds" not in page
    assert "| MiM-MU | 95.0 | 95.0 | 5.0 | 10.0 | 2.00 | 1 | yes |" in page  # UAs, never-erased drops, time
    assert "| MiM-MU | 95.0 | 95.0 | 5.0 | 10.0 | - | 1 | yes |" in page    # circle + diamond: no one-concept diamond
    # beside the pair, the same concepts alone: circle's 80% misses the bar the pair meets
    assert "| MiM-MU | 80.0 | 97.0 | 2.0 | no |" in page and page.count("UA circle alone") == 1
    # the resurgence row: UAs after each stage, the largest fall, the never-erased drop at the end
    assert "| MiM-MU | 97 | 87 | 77 | 93 | 90 | 99 | 20.0 | 5.0 | 1 | no |" in page
    assert (tmp_path / "multi_sequence_seeds3-5.png").exists() and "](multi_sequence_seeds3-5.png)" in page


def synthetic(method, falls, drops, seeds=(3, 4)):
    """Records of `method`: the sequence's earlier concepts fall by `falls` (points) by its end, the
    three sets and the sequence keep `drops` (in-domain drop, points) on the values never erased."""
    out = {}
    for s in seeds:
        for concepts, drop in zip(cm.SETS, drops):
            report = {"base": {"retain_in": 0.9}, "unlearned": {"retain_in": 0.9 - drop / 100, "ua": 0.95}}
            out[(method, cm.slug(concepts), s)] = {"seed": s, "train_time_s": 100.0,
                                                   "metrics": {"concepts": {c: report for c in concepts}}}
        stages = []
        for i, c in enumerate(cm.SEQUENCE):
            earlier = {e: {"now": {"ua": 1.0 - (falls[j] / 100 if i == 2 else 0.0)}} for j, e in enumerate(cm.SEQUENCE[:i])}
            stages.append({"concept": c, "metrics": {"base": {"retain_in": 0.9}, "earlier": earlier,
                                                     "unlearned": {"ua": 1.0, "retain_in": 0.9 - drops[3] / 100}}})
        out[(method, f"sequence-{cm.slug(cm.SEQUENCE)}", s)] = {"seed": s, "sequence": cm.SEQUENCE, "stages": stages}
    return out


def test_mim_mus_claims_are_paired_on_concepts_and_settings_with_the_claimed_side_above_zero(tmp_path, monkeypatch):
    monkeypatch.setattr(cm, "DOC", tmp_path / "multi.md")
    # MiM-MU barely resurges (2 and 4 points) and keeps (2-3 points); SalUn falls back 30 and 34 points
    # and drops 18-25: both comparisons hold, and MiM-MU meets both of its bars
    records = {**synthetic("mim_mu", [2, 4], [2, 3, 2, 3]), **synthetic("salun", [30, 34], [20, 22, 25, 21])}
    rows = {r[0]: r for r in cm.claims_rows(records)}
    assert rows["MiM-MU: no resurgence (every earlier concept's fall <= 10 points)"][1:4] == ["2", "largest fall 4.0",
                                                                                             "holds"]
    assert rows["MiM-MU: no degradation of unrelated concepts (never-erased drop <= 5 points, its bar)"][3] == "holds"
    assert rows["MiM-MU resurges less than SalUn (baseline)"][1:] == ["2", "29.0 [16.3, 41.7]", "holds", "holds"]
    assert rows["MiM-MU degrades unrelated concepts less than SalUn (baseline)"][1:3] == ["4", "19.5 [15.7, 23.3]"]
    # the other way round: MiM-MU is the one that falls back, and the claims fail
    swapped = {**synthetic("mim_mu", [30, 34], [2, 3, 2, 3]), **synthetic("salun", [2, 4], [2, 3, 2, 3])}
    rows = {r[0]: r for r in cm.claims_rows(swapped)}
    assert rows["MiM-MU: no resurgence (every earlier concept's fall <= 10 points)"][3] == "fails"
    assert rows["MiM-MU resurges less than SalUn (baseline)"][2:4] == ["-29.0 [-41.7, -16.3]", "fails"]
    assert rows["MiM-MU degrades unrelated concepts less than SalUn (baseline)"][3] == "inconclusive"  # all equal
    # pairs only on the seeds both ran: SalUn's seed 4 lost, MiM-MU's seed 4 leaves the comparison too
    records = {**synthetic("mim_mu", [2, 4], [2, 3, 2, 3]), **synthetic("salun", [30, 34], [20, 22, 25, 21], seeds=(3,)),
               **{k: v for k, v in synthetic("mim_mu", [50, 50], [40, 40, 40, 40], seeds=(4,)).items()}}
    rows = {r[0]: r for r in cm.claims_rows(records)}
    assert rows["MiM-MU resurges less than SalUn (baseline)"][2] == "29.0 [16.3, 41.7]"  # seed 3 alone
    assert rows["MiM-MU: no resurgence (every earlier concept's fall <= 10 points)"][2] == "largest fall 27.0"
