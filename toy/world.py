"""The toy world: procedural 32x32 images of coloured, textured shapes with captions.

Every image shows one object on a lightly noisy, light background. An object is either
*named* content (one of the named shapes, in a named colour, with a named fill texture) or
*unnamed* content (an irregular blob with an unnamed fill, such as a gradient), which is what
most images show, as in real data where any one concept is rare.

Captions name a random subset of the attributes of named content ("a striped red circle",
"a red shape", "a disc", "a shape"); captions of unnamed content never name a shape or a
texture. Each shape and texture also has a synonym ("disc" for circle), used in a share of the
captions, so that evaluation can tell whether an unlearning method erased a word or a concept.

Captions are dropped (replaced by "") for classifier-free guidance, mostly on unnamed content:
what the empty prompt learns is only the images whose captions were dropped, so this keeps
named shapes and textures rare in unconditional samples while captioned batches stay rich in
them (docs/toy_world.md).

Everything is a deterministic function of a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import common

SIZE = 32

SHAPES = ["circle", "square", "triangle", "cross", "diamond", "ring"]
SHAPE_SYNONYMS = {"circle": "disc", "square": "box", "triangle": "wedge",
                  "cross": "plus", "diamond": "rhombus", "ring": "hoop"}
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
TEXTURES = ["solid", "striped", "dotted", "checkered"]
TEXTURE_SYNONYMS = {"solid": "plain", "striped": "stripy", "dotted": "spotted",
                    "checkered": "chequered"}
# The judge has one extra class per attribute for content that no caption names.
OTHER = "other"
SHAPE_CLASSES = SHAPES + [OTHER]      # "other" = irregular blob
COLOUR_CLASSES = COLOURS + [OTHER]    # "other" = an off-palette colour (teal, grey, brown)
TEXTURE_CLASSES = TEXTURES + [OTHER]  # "other" = an unnamed fill (gradient)
# Words that only glue a caption together.
FILLER_WORDS = ["a", "an", "shape"]

RGB = {"red": (220, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 225),
       "yellow": (235, 210, 40), "purple": (145, 50, 185), "orange": (250, 140, 25)}
OFF_PALETTE = [(30, 165, 165), (115, 115, 115), (115, 70, 30)]  # teal, grey, brown

# The mix (see module docstring): share of images with named content, and caption dropout.
P_NAMED = 0.4
P_DROP_NAMED = 0.02
P_DROP_UNNAMED = 0.30
P_KEEP_ATTRIBUTE = 0.6   # each attribute of named content is named with this probability
P_SYNONYM = 0.25         # a named shape / texture is called by its synonym this often
P_OFF_PALETTE = 0.3      # unnamed content in an off-palette colour


def vocabulary() -> dict:
    """Which words are shapes, colours and textures (and their synonyms)."""
    return {
        "shape": SHAPES, "colour": COLOURS, "texture": TEXTURES,
        "synonyms": {**SHAPE_SYNONYMS, **TEXTURE_SYNONYMS},
        "classes": {"shape": SHAPE_CLASSES, "colour": COLOUR_CLASSES, "texture": TEXTURE_CLASSES},
        "filler": FILLER_WORDS,
    }


def all_words() -> list[str]:
    return (FILLER_WORDS + SHAPES + list(SHAPE_SYNONYMS.values()) + COLOURS
            + TEXTURES + list(TEXTURE_SYNONYMS.values()))


# 'a striped red circle'; omitted attributes are left out, a missing shape reads 'shape'. The grammar
# is written once, in common.py, where the methods' toy prompt sets are made from it too.
caption = common.toy_caption


@dataclass
class Labels:
    shape: np.ndarray    # (n,) index into SHAPE_CLASSES
    colour: np.ndarray   # (n,) index into COLOUR_CLASSES
    texture: np.ndarray  # (n,) index into TEXTURE_CLASSES


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5


def shape_mask(shape: str, cx: float, cy: float, r: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean (32, 32) mask of a shape centred at (cx, cy) with radius-like size r."""
    dx, dy = _XX - cx, _YY - cy
    d = np.sqrt(dx ** 2 + dy ** 2)
    if shape == "circle":
        return d <= r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.82 * r
    if shape == "triangle":  # apex up, base at the bottom
        top, bottom = -r, 0.8 * r
        frac = (dy - top) / (bottom - top)
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= frac * r * 1.05)
    if shape == "cross":
        arm = 0.36 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.1 * r
    if shape == "ring":
        return (d <= r) & (d >= 0.55 * r)
    if shape == OTHER:  # irregular blob: a radius that wobbles with angle (no 4-fold symmetry)
        theta = np.arctan2(dy, dx)
        radius = np.full_like(theta, r * 0.95)
        for k in (2, 3, 5):
            amp = rng.uniform(0.12, 0.28) if k < 5 else rng.uniform(0.0, 0.1)
            radius = radius + r * amp * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        return d <= radius
    raise ValueError(f"unknown shape {shape!r}")


def texture_pattern(texture: str, rng: np.random.Generator) -> np.ndarray:
    """(32, 32) float in [0, 1]: 1 = full colour, 0 = pale tint of the colour."""
    py, px = rng.integers(0, 6, size=2)
    y, x = _YY.astype(np.int64) + py, _XX.astype(np.int64) + px
    if texture == "solid":
        return np.ones((SIZE, SIZE), np.float32)
    if texture == "striped":  # horizontal bands, period 6
        return ((y // 3) % 2 == 0).astype(np.float32)
    if texture == "dotted":  # 2x2 dots on a period-5 grid
        return ((y % 5 < 2) & (x % 5 < 2)).astype(np.float32)
    if texture == "checkered":  # 3x3 cells
        return (((y // 3) + (x // 3)) % 2 == 0).astype(np.float32)
    if texture == OTHER:  # unnamed fill: a smooth gradient in a random direction
        a = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(a) * (_XX - 16) + np.sin(a) * (_YY - 16)) / 12.0
        return np.clip(0.6 + 0.4 * ramp, 0.1, 1.0).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}")


def draw(shape: str, colour, texture: str, rng: np.random.Generator) -> np.ndarray:
    """One (3, 32, 32) float32 image in [-1, 1]. `colour` is a name or an RGB tuple."""
    rgb = np.array(RGB[colour] if isinstance(colour, str) else colour, np.float32)
    rgb = np.clip(rgb + rng.normal(0, 8, size=3), 0, 255)
    bg_level = rng.uniform(222, 245)
    img = bg_level + rng.normal(0, 4, size=(SIZE, SIZE, 3)).astype(np.float32)
    r = rng.uniform(8.0, 11.5)
    cx, cy = rng.uniform(12.5, 19.5, size=2)
    mask = shape_mask(shape, cx, cy, r, rng)
    pattern = texture_pattern(texture, rng)[..., None]
    pale = 0.25 * rgb + 0.75 * 250.0
    fill = pattern * rgb + (1 - pattern) * pale
    img = np.where(mask[..., None], fill, img)
    img = np.clip(img, 0, 255)
    return (img.transpose(2, 0, 1) / 127.5 - 1.0).astype(np.float32)


def sample(rng: np.random.Generator, n: int, p_named: float = P_NAMED, drop: bool = True):
    """n random images with captions and labels.

    Returns (images (n, 3, 32, 32) float32 in [-1, 1], captions list[str], Labels).
    `drop=False` disables caption dropout (for CLIP and judge training); `p_named` changes the
    share of named content (1.0 = only named shapes and textures).
    """
    images = np.empty((n, 3, SIZE, SIZE), np.float32)
    captions, ls, lc, lt = [], [], [], []
    for i in range(n):
        if rng.random() < p_named:
            s, c, t = (rng.choice(SHAPES), rng.choice(COLOURS), rng.choice(TEXTURES))
            images[i] = draw(s, c, t, rng)
            keep = rng.random(3) < P_KEEP_ATTRIBUTE
            s_word = (SHAPE_SYNONYMS[s] if rng.random() < P_SYNONYM else s) if keep[0] else None
            t_word = (TEXTURE_SYNONYMS[t] if rng.random() < P_SYNONYM else t) if keep[2] else None
            cap = caption(s_word, c if keep[1] else None, t_word)
            dropped = drop and rng.random() < P_DROP_NAMED
            ls.append(SHAPES.index(s)); lc.append(COLOURS.index(c)); lt.append(TEXTURES.index(t))
        else:
            off = rng.random() < P_OFF_PALETTE
            c = OFF_PALETTE[rng.integers(len(OFF_PALETTE))] if off else rng.choice(COLOURS)
            images[i] = draw(OTHER, c, OTHER, rng)
            named_colour = (not off) and rng.random() < P_KEEP_ATTRIBUTE
            cap = caption(None, c if named_colour else None, None)
            dropped = drop and rng.random() < P_DROP_UNNAMED
            ls.append(len(SHAPES)); lc.append(len(COLOURS) if off else COLOURS.index(c))
            lt.append(len(TEXTURES))
        captions.append("" if dropped else cap)
    labels = Labels(np.array(ls), np.array(lc), np.array(lt))
    return images, captions, labels


def render(prompt_values: dict, n: int, rng: np.random.Generator) -> np.ndarray:
    """n images with the given attributes fixed (e.g. {"shape": "circle"}), the rest random named."""
    out = np.empty((n, 3, SIZE, SIZE), np.float32)
    for i in range(n):
        s = prompt_values.get("shape") or rng.choice(SHAPES)
        c = prompt_values.get("colour") or rng.choice(COLOURS)
        t = prompt_values.get("texture") or rng.choice(TEXTURES)
        out[i] = draw(s, c, t, rng)
    return out
