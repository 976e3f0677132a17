"""One run after another: `--model <run folder>` continues a saved run (chaining)."""

import dataclasses
import json

import pytest
import torch

import common
import eval as evaluation
import mim_mu
import pure


def save_fake_run(folder, unet, base_model: str, concept: str, chain: list | None = None):
    """A saved run folder whose UNet is `unet`: what a method leaves (unet/, run.json)."""
    unet.save_pretrained(folder / "unet")
    run = {"base_model": base_model, "method": "PURE", "args": {"concept": concept, "model": base_model}}
    if chain:
        run["chain"] = chain
    (folder / "run.json").write_text(json.dumps(run))
    return folder


def test_a_run_folder_loads_as_its_base_with_its_unet_and_is_the_reference(tiny_sd, tmp_path):
    base = common.load_models(str(tiny_sd), torch.device("cpu"))
    unet = common.frozen_copy(base.unet)
    with torch.no_grad():  # a "trained" UNet: every weight moved
        for p in unet.parameters():
            p.add_(1e-3)
    run = save_fake_run(tmp_path / "a", unet, str(tiny_sd), "church")
    models = common.load_models(str(run), torch.device("cpu"))
    assert models.name == str(tiny_sd) and models.chain == [{"run": str(run), "method": "PURE", "concept": "church"}]
    ref = common.frozen_copy(models.unet)  # what every method freezes as its reference: the run's UNet
    for (name, p), q in zip(ref.named_parameters(), unet.parameters()):
        assert torch.equal(p, q), name
    assert common.base_model_name(str(run)) == str(tiny_sd) and common.base_model_name("toy") == "toy"


def test_retain_prompts_leave_out_every_concept_erased_before(toy_models):
    chained = dataclasses.replace(toy_models, chain=[{"run": "x", "method": "PURE", "concept": "circle"}])
    ps, before = common.concept_prompts("square", chained), common.concept_prompts("square", toy_models)
    assert "circle" in [v for _, v in before.retain_in] and any("circle" in p.split() for p in before.retain)
    assert "circle" not in [v for _, v in ps.retain_in]
    assert not any("circle" in p.split() for p in ps.retain + [p for p, _, _ in ps.retain_cross])
    assert len(ps.retain_in) == len(before.retain_in) - 1 and ps.forget == before.forget


@pytest.mark.slow(15)
def test_a_chained_toy_run_gets_the_toy_defaults_and_reports_the_earlier_concept(toy_models, tmp_path):
    run = save_fake_run(tmp_path / "pure-circle", toy_models.unet, "toy", "circle")
    args = pure.parse_args(["--model", str(run), "--concept", "square"])
    assert args.steps == pure.TOY_DEFAULTS["steps"] and args.lr == pure.TOY_DEFAULTS["lr"]
    models = common.load_models(str(run), torch.device("cpu"))
    assert models.is_toy and models.erased == ["circle"]
    ps = common.concept_prompts("square", models)
    m = evaluation.report(models, ps, models.unet, None, n=2, seed=0)
    earlier = m["earlier"]["circle"]
    assert set(earlier) == {"base", "now"} and set(earlier["now"]) == {"ua", "ua_synonym"}
    assert earlier["now"] == earlier["base"]  # the same weights: the same images, the same answers
    assert "erased earlier, circle: UA" in evaluation.format_table(m)


@pytest.mark.slow(10)
def test_an_earlier_run_of_several_concepts_reports_each_and_reuses_its_base_figures(toy_models, tmp_path):
    run = save_fake_run(tmp_path / "pure-circle-striped", toy_models.unet, "toy", "circle + striped")
    figures = lambda ua: {"ua": ua, "ua_synonym": ua}  # noqa: E731  marked values: which were read
    own = {c: {"seed": 0, "n_forget_images": 2, "base": figures(0.25), "unlearned": figures(0.75)}
           for c in ("circle", "striped")}
    own["striped"]["seed"] = 1  # its base images were other ones: drawn again, not read
    (run / "metrics.json").write_text(json.dumps({"concept": "circle + striped", "concepts": own}))
    models = common.load_models(str(run), torch.device("cpu"))
    earlier = evaluation.earlier_concepts(models, models.unet, models.unet, evaluation.Judge(models), n=2, seed=0)
    assert set(earlier) == {"circle", "striped"}
    assert earlier["circle"]["base"] == figures(0.25) and earlier["circle"]["after_its_run"] == figures(0.75)
    assert earlier["striped"]["base"] == earlier["striped"]["now"]  # drawn: the same weights, the same answers
    assert earlier["striped"]["now"]["ua"] in (0.0, 0.5, 1.0)


@pytest.mark.slow(25)
def test_two_runs_in_a_row_record_the_chain_and_load_in_diffusers(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    first, second = tmp_path / "pure-church", tmp_path / "mim_mu-van-gogh"
    small = ["--n-forget", "2", "--batch-size", "2", "--n-eval-images", "0", "--device", "cpu"]
    pure.main(["--model", str(tiny_sd), "--concept", "church", "--steps", "2", "--n-retain", "2",
               "--output-dir", str(first), *small])
    mim_mu.main(["--model", str(first), "--concept", "Van Gogh", "--epochs", "1", "--output-dir", str(second), *small])
    run = json.loads((second / "run.json").read_text())
    assert run["base_model"] == str(tiny_sd) and run["args"]["model"] == str(first)
    assert run["chain"] == [{"run": str(first), "method": "PURE", "concept": "church"}]
    # the second run started from the first: it moved weights the first had already moved
    a = UNet2DConditionModel.from_pretrained(first / "unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(second / "unet").state_dict()
    base = UNet2DConditionModel.from_pretrained(tiny_sd / "unet").state_dict()
    moved_by_first = {k for k in a if not torch.equal(a[k], base[k])}
    assert moved_by_first and all(torch.equal(b[k], a[k]) or ".attn2." in k for k in a)
    assert any(not torch.equal(b[k], a[k]) for k in moved_by_first)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, unet=UNet2DConditionModel.from_pretrained(second / "unet"),
                                                   safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a church", num_inference_steps=2, output_type="pt").images.shape[0] == 1


def test_retain_prompts_match_erased_names_as_words_and_an_empty_retain_set_is_refused(toy_models):
    class Chained:  # an SD model that erased "Van Gogh": "a painting in the style of Van Gogh" goes,
        is_toy, toy, conditional, erased = False, None, True, ["Van Gogh", "Art"]  # "an artwork by ..." stays
    ps = common.concept_prompts("Claude Monet", Chained())
    assert not any("Van Gogh" in p for p in ps.retain) and any(p.startswith("an artwork by") for p in ps.retain)
    shapes = toy_models.toy["vocabulary"]["shape"]
    gone = [{"run": "x", "method": "PURE", "concept": s} for s in shapes if s != "circle"]
    with pytest.raises(common.UsageError, match="names a concept erased earlier"):
        common.concept_prompts("circle", dataclasses.replace(toy_models, chain=gone))

