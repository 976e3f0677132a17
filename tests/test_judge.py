"""The toy judges see shapes, not colours: a stress set of degraded renders with known labels.

The degradations below are written here, independently of the build's training augmentations,
and each is reported on its own (run with -s to see the table). They are the ways unlearned
models' images degrade: paler, lower in contrast, desaturated, hue-shifted, blurred, noisy.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
from toy import world
from toy.judge import HEADS, load_judge

N = 480  # 20 renders of each of the 24 shape x texture pairs, colours cycling


def _renders(seed: int = 12345):
    """Named renders (shape, colour, texture all named) with their labels, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    pairs = [(s, t) for s in world.SHAPES for t in world.TEXTURES]
    images, labels = [], {h: [] for h in HEADS}
    for i in range(N):
        s, t = pairs[i % len(pairs)]
        c = world.COLOURS[(i // len(pairs)) % len(world.COLOURS)]
        images.append(world.draw(s, c, t, rng))
        labels["shape"].append(world.SHAPE_CLASSES.index(s))
        labels["colour"].append(world.COLOUR_CLASSES.index(c))
        labels["texture"].append(world.TEXTURE_CLASSES.index(t))
    return torch.from_numpy(np.stack(images)), {h: torch.tensor(v) for h, v in labels.items()}


def _in_unit(f):
    """Apply f to images in [0, 1] and return them in [-1, 1]."""
    return lambda x: (f((x + 1) / 2).clamp(0, 1) * 2 - 1)


def _blur3(v):
    return F.avg_pool2d(F.pad(v, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def _noise(x, std=0.15, seed=7):
    return (x + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))).clamp(-1, 1)


# name -> (degradation, the accuracy the shape and texture heads must reach)
DEGRADATIONS = {
    "clean": (lambda x: x, 0.95),
    "halfway to white": (_in_unit(lambda v: v + 0.5 * (1 - v)), 0.95),
    "half contrast": (_in_unit(lambda v: v.mean(dim=(1, 2, 3), keepdim=True)
                                 + 0.5 * (v - v.mean(dim=(1, 2, 3), keepdim=True))), 0.95),
    "80% desaturated": (_in_unit(lambda v: v.mean(1, keepdim=True) + 0.2 * (v - v.mean(1, keepdim=True))), 0.95),
    "hue rotated 120 degrees": (_in_unit(lambda v: v[:, [1, 2, 0]]), 0.95),  # a cyclic RGB shift
    "3x3 blur": (_in_unit(_blur3), 0.95),
    "noise 0.15": (_noise, 0.95),
    "70% to white": (_in_unit(lambda v: v + 0.7 * (1 - v)), 0.90),
}


@pytest.fixture(scope="module")
def stress():
    images, labels = _renders()
    judges = {name: load_judge(common.TOY_DIR / name) for name in ("judge", "judge2")}
    table = {}
    for name, (degrade, _) in DEGRADATIONS.items():
        x = degrade(images)
        for j, judge in judges.items():
            pred = judge.predict(x)
            table[(name, j)] = {h: (pred[h] == labels[h]).float().mean().item() for h in HEADS}
    print("\n| degradation | judge shape / texture / colour | judge2 shape / texture / colour |")
    for name in DEGRADATIONS:
        print(f"| {name} | " + " | ".join(" / ".join(f"{table[(name, j)][h]:.1%}" for h in
                                                    ("shape", "texture", "colour")) for j in judges) + " |")
    return table


@pytest.mark.slow(18)
@pytest.mark.parametrize("degradation", list(DEGRADATIONS))
@pytest.mark.parametrize("which", ["judge", "judge2"])
def test_shape_and_texture_heads_read_the_form_of_degraded_renders(stress, degradation, which):
    acc, bar = stress[(degradation, which)], DEGRADATIONS[degradation][1]
    assert acc["shape"] >= bar and acc["texture"] >= bar, acc


@pytest.mark.slow(5)
@pytest.mark.parametrize("which", ["judge", "judge2"])
def test_the_colour_head_reads_clean_colours(stress, which):
    assert stress[("clean", which)]["colour"] >= 0.99


@pytest.mark.parametrize("which", ["judge", "judge2"])
def test_degenerate_images_are_other_for_every_head(which):
    g = torch.Generator().manual_seed(3)
    n = 60
    blank = (0.88 + 0.01 * torch.randn(n, 3, 32, 32, generator=g)).clamp(0, 1)      # background only
    fill = torch.rand(n, 3, 1, 1, generator=g).expand(n, 3, 32, 32).clone()         # one flat colour
    noise = torch.rand(n, 3, 32, 32, generator=g)                                   # uniform noise
    judge = load_judge(common.TOY_DIR / which)
    for name, v in (("blank", blank), ("full-frame fill", fill), ("noise", noise)):
        pred = judge.predict(v * 2 - 1)
        for h in HEADS:
            other = judge.classes[h].index("other")
            share = (pred[h] == other).float().mean().item()
            assert share >= 0.95, (name, h, share)


def test_the_two_judges_are_different_models():
    a, b = load_judge(common.TOY_DIR / "judge"), load_judge(common.TOY_DIR / "judge2")
    assert (a.arch, b.arch) == ("resnet", "cnn")
    assert next(a.parameters()).dtype == torch.float32  # stored float16, loaded float32


def test_judge_training_is_deterministic_for_a_seed():
    from diffusers import AutoencoderKL

    from toy.build import train_judge
    vae = AutoencoderKL.from_pretrained(common.TOY_DIR / "pipeline", subfolder="vae", torch_dtype=torch.float32)
    vae = vae.eval().requires_grad_(False)
    a = train_judge(vae, 2, "cpu", seed=5, arch="resnet", batch=32)
    b = train_judge(vae, 2, "cpu", seed=5, arch="resnet", batch=32)
    c = train_judge(vae, 2, "cpu", seed=6, arch="resnet", batch=32)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
