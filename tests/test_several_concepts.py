"""Several concepts in one run: a repeated --concept."""

import json

import pytest
import torch

import common
import eval as evaluation
import pure


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


def test_methods_with_a_per_concept_term_refuse_several_concepts_in_one_sentence():
    import attack  # noqa: F401
    for script in ("rl_critic", "baselines.salun", "baselines.fmn"):
        module = __import__(script, fromlist=["main"])
        with pytest.raises(common.UsageError, match="takes one --concept per run for now"):
            module.main(["--model", "toy", "--concept", "circle", "--concept", "square", "--output-dir", "/nonexistent/x"])


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
