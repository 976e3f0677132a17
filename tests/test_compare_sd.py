"""benchmarks/compare_sd.py end to end on tiny models: two methods train a few steps on a tiny
random SD pipeline, are evaluated by a tiny random ImageNet classifier and the toy CLIP, leave
records, and --report-only rebuilds the page from them. No real model is ever loaded."""

import json

import pytest
import torch

import common
from benchmarks import compare_sd


def make_tiny_classifier(folder):
    """A random ResNet with ImageNet's 1000 classes (what microsoft/resnet-50 is), a few kB."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification
    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                      layer_type="basic", num_labels=1000))
    model.save_pretrained(folder)
    ConvNextImageProcessor().save_pretrained(folder)
    return folder


@pytest.mark.slow(50)
def test_two_methods_on_tiny_models_become_records_and_a_report(tiny_sd, tmp_path, capsys):
    records, docs = tmp_path / "records", tmp_path / "docs"
    common_args = ["--model", str(tiny_sd), "--classifier", str(make_tiny_classifier(tmp_path / "resnet")),
                   "--clip", str(common.TOY_DIR / "clip"), "--concepts", "church", "Van Gogh", "--n-images", "4",
                   "--device", "cpu", "--records", str(records), "--work", str(tmp_path / "work"),
                   "--docs", str(docs), "--allow-dirty"]
    compare_sd.main([*common_args, "--methods", "esd", "--method-args", "--steps 2 --sample-steps 3"])
    compare_sd.main([*common_args, "--methods", "mim_mu", "--method-args", "--epochs 1 --n-forget 4"])
    made = sorted(p.relative_to(records).as_posix() for p in records.rglob("*.json"))
    assert made == ["base/church-seed0.json", "base/van-gogh-seed0.json", "esd/church-seed0.json",
                    "esd/van-gogh-seed0.json", "mim_mu/church-seed0.json", "mim_mu/van-gogh-seed0.json"]
    rec = json.loads((records / "esd" / "van-gogh-seed0.json").read_text())
    assert rec["model"] == str(tiny_sd) and rec["hardware"].startswith("CPU")
    assert rec["command"].endswith("--concept 'Van Gogh' --seed 0 --steps 2 --sample-steps 3")  # runnable as is
    assert rec["args"]["steps"] == 2 and rec["n_images"] == 4
    base = json.loads((records / "base" / "van-gogh-seed0.json").read_text())
    assert rec["base"] == base["metrics"]  # every method is compared with the one base evaluation
    # the style judge is CLIP zero-shot over the 10 artists; retain counts the other artists (the
    # first 4 of the nine at 4 images a group), the objects' the other Imagenette classes
    assert set(rec["unlearned"]["retain_in_per_value"]) == set([a for a in common.ARTISTS if a != "Van Gogh"][:4])
    church = json.loads((records / "mim_mu" / "church-seed0.json").read_text())
    assert set(church["unlearned"]["retain_in_per_value"]) == set([c for c in common.IMAGENETTE if c != "church"][:4])
    for m in (rec["unlearned"], church["unlearned"]):
        assert 0 <= m["ua"] <= 1 and m["kid_clip"] == m["kid_clip"] and m["fd_clip"] >= 0

    # a record that exists is never redone; --report-only rebuilds the page from the records alone
    capsys.readouterr()
    compare_sd.main([*common_args, "--methods", "esd", "mim_mu"])
    assert "0 runs made" in capsys.readouterr().out
    (docs / "results.md").unlink()
    compare_sd.main([*common_args, "--report-only"])
    page = (docs / "results.md").read_text()
    assert "## objects" in page and "## styles" in page and "| ESD (baseline) | 1 (1) |" in page
    assert "GPU-hours for 20 runs" in page and (docs / "tradeoff_styles.png").exists()
    assert "| base model (evaluation and noise floor) | 2 |" in page
    assert "MiM-MU (objects)" in (docs / "claims.md").read_text()


def test_shards_split_the_units_and_bad_concepts_are_refused(tmp_path):
    units = [(0, c) for c in common.IMAGENETTE + common.ARTISTS]
    parts = [compare_sd.shard(units, f"{k}/3") for k in (1, 2, 3)]
    assert sorted(u for p in parts for u in p) == sorted(units)
    with pytest.raises(SystemExit, match="not a concept"):
        compare_sd.main(["--concepts", "circle", "--records", str(tmp_path), "--report-only"])
