"""Several concepts in one run: a repeated --concept."""

import json

import pytest
import torch

import common
import eval as evaluation
import pure
from conftest import run_script


def test_a_repeated_concept_joins_and_its_prompt_sets_merge_keeping_each_concept_apart(toy_models):
    args = pure.parse_args(["--model", "toy", "--concept", "circle", "--concept", "striped"])
    assert args.concept == "circle + striped" and common.concept_names(args.concept) == ["circle", "striped"]
    assert str(common.default_output_dir("pure", args.concept)) == "outputs/pure-circle-striped"
    ps = common.concept_prompts(args.concept, toy_models)
    one = {c: common.concept_prompts(c, toy_models) for c in ("circle", "striped")}
    assert ps.kind == "mixed" and [p.concept for p in ps.parts] == ["circle", "striped"]
    assert set(ps.forget) == set(one["circle"].forget) | set(one["striped"].forget)
    # no retain prompt names either concept, in the merged set or in each part
    for s in [ps] + ps.parts:
        prompts = s.retain + [p for p, _ in s.retain_in] + [p for p, _, _ in s.retain_cross]
        assert prompts and not any({"circle", "striped"} & set(p.split()) for p in prompts)
    assert ps.parts[0].retain_in == [r for r in one["circle"].retain_in]  # a shape's neighbours: all kept
    assert "striped" not in [v for _, _, v in ps.parts[0].retain_cross]
    assert common.concept_kind("circle + square", "toy") == "shape"


def test_what_still_takes_one_concept_refuses_several_in_one_sentence():
    import rl_critic
    import vdu
    with pytest.raises(common.UsageError, match="takes one --concept per run for now"):
        rl_critic.main(["--model", "toy", "--concept", "circle", "--concept", "square", "--reward", "classifier",
                        "--output-dir", "/nonexistent/x"])
    with pytest.raises(common.UsageError, match="takes one --concept per run for now"):
        vdu.main(["--model", "toy-uncond", "--concept", "circle", "--concept", "square", "--output-dir", "/nonexistent/x"])


def test_salun_relabels_each_concept_a_prompt_names_within_its_own_kind_and_never_as_another_erased(toy_models):
    import sys
    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "baselines"))
    import salun
    ps = common.concept_prompts("circle + striped + square", toy_models)
    shapes, textures = set(toy_models.toy["vocabulary"]["shape"]), set(toy_models.toy["vocabulary"]["texture"])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        words = set(salun.relabel("a striped circle", ps, g).split())
        assert not words & {"circle", "striped", "square"}
        assert len(words & (shapes - {"circle", "square"})) == 1 and len(words & (textures - {"striped"})) == 1


def test_cgru_rewards_a_forget_image_for_leaving_its_own_concept(toy_models):
    import torch.nn.functional as F

    import rl_critic
    clip = evaluation.load_clip(toy_models)
    ps = common.concept_prompts("circle + striped", toy_models)
    prompts = ["a circle", "a striped shape", "a red square"]
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    roll = {"prompts": prompts, "is_forget": torch.tensor([True, True, False]), "images": images,
            "text": clip.text_features(prompts)}
    r = rl_critic.evaluation.terminal_rewards("clip", roll, ps, clip, None)
    img = F.normalize(clip.image_features(images), dim=-1)
    concept_text = F.normalize(clip.text_features([ps.parts[0].forget[0], ps.parts[1].forget[0]]), dim=-1)
    assert torch.allclose(r[0], -(img[0] @ concept_text[0]), atol=1e-6)   # circle's own text
    assert torch.allclose(r[1], -(img[1] @ concept_text[1]), atol=1e-6)   # striped's own text
    assert torch.allclose(r[2], img[2] @ F.normalize(roll["text"][2], dim=-1), atol=1e-6)


@pytest.mark.slow(20)
def test_the_report_of_several_concepts_has_each_ones_ua_and_the_table_prints_each(toy_models):
    ps = common.concept_prompts("circle + striped", toy_models)
    m = evaluation.report(toy_models, ps, toy_models.unet, None, n=2, seed=0)
    assert set(m["concepts"]) == {"circle", "striped"}
    for c, one in m["concepts"].items():
        assert one["concept"] == c and one["unlearned"]["ua"] == one["base"]["ua"]  # the same weights
    assert "circle:" in evaluation.format_table(m) and "striped:" in evaluation.format_table(m)
    json.dumps(m)  # metrics.json


@pytest.mark.slow(20)
def test_pure_erases_two_concepts_of_a_tiny_sd_pipeline_in_one_run(tiny_sd, tmp_path):
    out = tmp_path / "run"
    pure.main(["--model", str(tiny_sd), "--concept", "church", "--concept", "Van Gogh", "--steps", "2",
               "--n-forget", "2", "--n-retain", "2", "--batch-size", "2", "--n-eval-images", "0",
               "--output-dir", str(out), "--device", "cpu"])
    run = json.loads((out / "run.json").read_text())
    assert run["args"]["concept"] == "church + Van Gogh"
    models = common.load_models(str(out), torch.device("cpu"))
    assert models.erased == ["church", "Van Gogh"]  # a run continuing it keeps neither


@pytest.mark.slow(15)
def test_compare_shows_each_concept_of_runs_of_several_concepts(toy_models, tmp_path):
    from PIL import Image
    from test_chaining import save_fake_run
    runs = []
    for name, ua in (("pure", 0.5), ("esd", 0.75)):
        run = save_fake_run(tmp_path / f"{name}-circle-striped", toy_models.unet, "toy", "circle + striped")
        report = lambda c, ua=ua: {"concept": c, "kind": "shape" if c == "circle" else "texture", "seed": 0,  # noqa: E731
                                   "n_forget_images": 4, "judge": "toy judge", "clip_model": "toy CLIP",
                                   "base": {"ua": 0.0}, "unlearned": {"ua": ua if c == "circle" else ua / 2}}
        (run / "metrics.json").write_text(json.dumps({"concept": "circle + striped", "wall_time_s": 1.0,
                                                      "concepts": {c: report(c) for c in ("circle", "striped")}}))
        runs.append(run)
    table = evaluation.compare(runs, tmp_path / "grid.png", n_seeds=1)
    circle, striped = table.split("striped:\n")
    assert circle.startswith("circle:\n") and "| pure-circle-striped | 50.0%" in circle
    assert "| esd-circle-striped | 75.0%" in circle and "| esd-circle-striped | 37.5%" in striped
    # rows: each concept's forget and synonym prompt, then two retain prompts; columns: base + 2 runs
    assert Image.open(tmp_path / "grid.png").size[1] >= 6 * 96
    other = save_fake_run(tmp_path / "pure-circle", toy_models.unet, "toy", "circle")
    (other / "metrics.json").write_text(json.dumps({"concept": "circle"}))
    with pytest.raises(common.UsageError, match="runs of the same concept"):
        evaluation.compare([runs[0], other], tmp_path / "grid.png")


def test_the_same_concept_twice_or_its_synonym_is_refused_in_one_sentence(toy_models):
    for concepts in (["circle", "Circle"], ["church", "chapel"], ["Van Gogh", "Vincent"]):
        args = pure.parse_args(["--model", "toy", *[f for c in concepts for f in ("--concept", c)]])
        with pytest.raises(common.UsageError, match="again .the same concept or its synonym"):
            common.prompt_set(args.concept, toy_models.toy if concepts[0] == "circle" else None)
    assert [p.concept for p in common.prompt_set("church + Van Gogh", None).parts] == ["church", "Van Gogh"]


@pytest.mark.slow(8)
def test_a_chain_refuses_a_concept_it_already_erased_and_a_base_model_that_cannot_load(toy_models, tmp_path):
    import dataclasses
    from test_chaining import save_fake_run
    chained = dataclasses.replace(toy_models, chain=[{"run": "x", "method": "PURE", "concept": "striped + square"}])
    with pytest.raises(common.UsageError, match="'square' names 'square', which this model already erased"):
        common.concept_prompts("circle + square", chained)
    run = save_fake_run(tmp_path / "run", toy_models.unet, str(tmp_path / "gone"), "circle")
    r = run_script("pure.py", "--model", run, "--concept", "square", "--output-dir", tmp_path / "out")
    assert r.returncode == 2 and "its base model, which could not be loaded" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
    # a folder with a run.json but no result (a run that stopped before saving): refused as early
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "run.json").write_text(json.dumps({"base_model": "toy", "args": {"concept": "circle"}}))
    r = run_script("pure.py", "--model", tmp_path / "unfinished", "--concept", "square", "--output-dir", tmp_path / "o2")
    assert r.returncode == 2 and "is not a finished run" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o2").exists()
