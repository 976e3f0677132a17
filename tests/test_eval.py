"""eval.py: the base toy model's figures, the command line, and --compare."""

import json
import subprocess
import sys
from pathlib import Path

import torch

import common
import eval as ev

ROOT = Path(__file__).resolve().parents[1]


def test_base_model_evaluation_on_the_toy_reproduces_the_toy_worlds_quality(toy_models):
    ps = common.concept_prompts("circle", toy_models)
    m = ev.report(toy_models, ps, n=32, seed=0)
    base = m["base"]
    print(json.dumps(m, indent=1))
    # the base model draws the concept (low UA, by its name and by its synonym) and the rest
    assert base["ua"] <= 0.15 and base["ua_synonym"] <= 0.2
    assert base["retain_in"] >= 0.85 and base["retain_cross"] >= 0.85
    assert set(base["retain_in_per_value"]) == {"square", "triangle", "cross", "diamond", "ring"}
    # CLIP agrees more with an image's own prompt than with a shuffled one
    clip = ev.load_clip(toy_models)
    es = ev.eval_set(ps, 16, 0)
    images = common.sample(toy_models, es.groups["retain_in"], es.seeds["retain_in"]).images
    own = ev.clip_score(clip, images, es.groups["retain_in"])
    shuffled = ev.clip_score(clip, images, es.groups["retain_in"][1:] + es.groups["retain_in"][:1])
    assert own > shuffled + 2


def test_eval_cli_prints_the_metrics_json_shape():
    r = subprocess.run([sys.executable, "eval.py", "--model", "toy", "--concept", "striped",
                        "--n-images", "8", "--json", "--device", "cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["concept"] == "striped" and m["kind"] == "texture" and m["n_forget_images"] == 8
    assert {"ua", "ua_synonym", "retain_in", "retain_cross", "clip_forget", "clip_retain"} <= set(m["base"])
