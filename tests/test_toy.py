"""The toy world: it loads offline, it is deterministic, and the base model knows its concepts."""

import json

import numpy as np
import pytest
import torch

import common
from toy import world
from toy.judge import load_judge

TOY = common.TOY_DIR


def test_pipeline_clip_judge_and_snapshots_load_offline_as_float32():
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPModel

    pipe = StableDiffusionPipeline.from_pretrained(TOY / "pipeline")  # HF_HUB_OFFLINE=1 (conftest)
    assert pipe.safety_checker is None
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert next(module.parameters()).dtype == torch.float32
    clip = CLIPModel.from_pretrained(TOY / "clip")
    assert next(clip.parameters()).dtype == torch.float32
    judge = load_judge(TOY / "judge")
    assert set(judge.classes) == {"shape", "colour", "texture"}
    snapshots = sorted((TOY / "snapshots").iterdir())
    assert len(snapshots) >= 3
    base = dict(pipe.unet.named_parameters())
    for folder in snapshots:
        snap = UNet2DConditionModel.from_pretrained(folder)
        params = dict(snap.named_parameters())
        assert params.keys() == base.keys()
        # a snapshot is a nearby but different model: continued training moved every layer a little
        rel = (params["conv_in.weight"] - base["conv_in.weight"]).norm() / base["conv_in.weight"].norm()
        assert 0 < rel < 0.5


def test_tokenizer_spells_every_toy_word_as_one_token():
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(TOY / "pipeline" / "tokenizer")
    for word in world.all_words():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word


def test_toy_json_describes_vocabulary_and_recommended_sampling():
    info = json.loads((TOY / "toy.json").read_text())
    assert info["vocabulary"]["shape"] == world.SHAPES
    assert info["vocabulary"]["synonyms"]["circle"] == "disc"
    assert info["recommended"]["num_inference_steps"] > 0 and info["recommended"]["guidance_scale"] > 1


def test_world_is_deterministic_and_its_labels_agree_with_the_judge_on_fresh_images():
    a, caps_a, lab_a = world.sample(np.random.default_rng(123), 64)
    b, caps_b, lab_b = world.sample(np.random.default_rng(123), 64)
    assert np.array_equal(a, b) and caps_a == caps_b and np.array_equal(lab_a.shape, lab_b.shape)
    images, _, labels = world.sample(np.random.default_rng(987654), 600, p_named=0.6, drop=False)
    pred = load_judge(TOY / "judge").predict(torch.from_numpy(images))
    for head in ("shape", "colour", "texture"):
        acc = (pred[head].numpy() == getattr(labels, head)).mean()
        assert acc >= 0.99, f"judge {head} accuracy {acc:.3f} on 600 fresh images"


def test_captions_of_unnamed_content_never_name_a_shape_or_texture():
    _, captions, labels = world.sample(np.random.default_rng(5), 2000)
    named_words = set(world.SHAPES + world.TEXTURES + list(world.SHAPE_SYNONYMS.values())
                      + list(world.TEXTURE_SYNONYMS.values()))
    unnamed = labels.shape == len(world.SHAPES)
    assert 0.5 < unnamed.mean() < 0.7  # most images show unnamed content
    for cap, u in zip(captions, unnamed):
        if u:
            assert not named_words & set(cap.split()), cap
    # captions are dropped mostly on unnamed content, so the empty prompt rarely means a named shape
    dropped = np.array([c == "" for c in captions])
    assert dropped[unnamed].mean() > 10 * dropped[~unnamed].mean()


@pytest.fixture(scope="module")
def judge():
    return load_judge(TOY / "judge")


def _accuracy(models, judge, head, prompts_values, n, seed):
    prompts = [p for p, _ in prompts_values for _ in range(n)]
    images = common.sample(models, prompts, [seed + i for i in range(len(prompts))]).images
    pred = judge.predict(images)[head].view(len(prompts_values), n)
    classes = judge.classes[head]
    return {v: (pred[i] == classes.index(v)).float().mean().item() for i, (_, v) in enumerate(prompts_values)}


@pytest.mark.slow(34)
def test_base_model_draws_every_named_value_reduced_sample(toy_models, judge):
    """A reduced sample of the build's quality table (24 images per value instead of 32)."""
    n = 24
    shapes = _accuracy(toy_models, judge, "shape", [(world.caption(s), s) for s in world.SHAPES], n, 10_000)
    shape_syn = _accuracy(toy_models, judge, "shape",
                          [(world.caption(world.SHAPE_SYNONYMS[s]), s) for s in world.SHAPES], n, 20_000)
    colours = _accuracy(toy_models, judge, "colour", [(world.caption(colour=c), c) for c in world.COLOURS], n, 30_000)
    textures = _accuracy(toy_models, judge, "texture", [(world.caption(texture=t), t) for t in world.TEXTURES], n, 40_000)
    tex_syn = _accuracy(toy_models, judge, "texture",
                        [(world.caption(texture=world.TEXTURE_SYNONYMS[t]), t) for t in world.TEXTURES], n, 50_000)
    report = {"shape": shapes, "shape synonym": shape_syn, "colour": colours, "texture": textures,
              "texture synonym": tex_syn}
    print(json.dumps(report, indent=1))
    assert np.mean(list(shapes.values())) >= 0.90, report
    assert np.mean(list(colours.values())) >= 0.90, report
    assert np.mean(list(textures.values())) >= 0.85, report
    assert np.mean(list(shape_syn.values())) >= 0.85, report
    assert np.mean(list(tex_syn.values())) >= 0.85, report
    assert min(min(v.values()) for v in (shapes, colours, textures)) >= 0.75, report


@pytest.mark.slow(38)
def test_named_shapes_and_textures_are_rare_in_unconditional_samples(toy_models, judge):
    n = 256
    images = common.sample(toy_models, [""] * n, list(range(60_000, 60_000 + n))).images
    pred = judge.predict(images)
    shares = {s: (pred["shape"] == i).float().mean().item() for i, s in enumerate(world.SHAPES)}
    shares |= {t: (pred["texture"] == i).float().mean().item() for i, t in enumerate(world.TEXTURES)}
    print(shares)
    assert max(shares.values()) <= 0.05, shares
