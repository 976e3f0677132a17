"""How an unlearning result is judged: UA, synonym UA, retain accuracy, CLIP score, FD-CLIP.

    python eval.py --model toy --concept circle          # the base model's figures
    python eval.py --run outputs/pure-circle             # a saved run against its base model
    python eval.py --compare outputs/*-circle            # one table + one grid for several runs

Metrics (accuracies are fractions in [0, 1]):
- UA, unlearning accuracy: share of images from forget prompts that the judge does NOT classify
  as the concept (higher is better). Synonym UA: the same with prompts that name the concept
  only by a synonym or paraphrase (erasing a word is not erasing a concept).
- Retain accuracy: share of images from retain prompts classified as their own prompted value,
  in-domain (same kind as the concept) and cross-domain (the other kinds).
- CLIP score: 100 * cos(CLIP image, CLIP prompt) on forget and on retain prompts.
- FD-CLIP: Frechet distance between CLIP image features of the unlearned and the base model's
  retain-prompt images, same seeds (0 = unchanged).
Judges: on the toy, the toy classifier (toy/judge; toy/judge2, another architecture, cross-checks
it: the share of images on which they agree is reported per group) and the toy CLIP; on Stable Diffusion,
microsoft/resnet-50 for Imagenette objects, CLIP zero-shot over artists for styles, NudeNet (if
installed) for nudity.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common

SD_CLIP = "openai/clip-vit-large-patch14"
SD_RESNET = "microsoft/resnet-50"
# ImageNet class index of each Imagenette class (what ResNet-50's top-1 must equal), from common's
# concept table.
IMAGENET_INDEX = {name: c.imagenet_class for name, c in common.SD_CONCEPTS.items() if c.kind == "object"}


# ---------------------------------------------------------------------------------------------
# The protocol: what is compared, the bar each must meet, how tables show it, which seeds it draws
# ---------------------------------------------------------------------------------------------

# The methods and baselines a comparison runs: the script, the name in tables, and the bar. A run
# meets the bar when its UA is at least BAR_UA and its in-domain retain at most max_retain_drop
# below the base model's (each method's own claim sets its bar: MiM-MU claims no compensation is
# needed, so its bar is the strictest; the two baselines: the bar their issue set).
BAR_UA = 0.90
METHODS = {
    "pure":      dict(script="pure.py",            label="PURE",             max_retain_drop=0.10),
    "mim_mu":    dict(script="mim_mu.py",          label="MiM-MU",           max_retain_drop=0.05),
    "vdu":       dict(script="vdu.py",             label="VDU",              max_retain_drop=0.10),
    "rl_critic": dict(script="rl_critic.py",       label="CGRU",             max_retain_drop=0.15),
    "esd":       dict(script="baselines/esd.py",   label="ESD (baseline)",   max_retain_drop=0.15),
    "salun":     dict(script="baselines/salun.py", label="SalUn (baseline)", max_retain_drop=0.15),
    "fmn":       dict(script="baselines/fmn.py",   label="FMN (baseline)",   max_retain_drop=0.15),
}
BAR_RETAIN_DROP = {name: m["max_retain_drop"] for name, m in METHODS.items()}  # the same, by method

# Every column a table can show, by key: a field of metrics.json (a fraction where the unit is %)
# or one of the benchmark's figures (already in % or points). key -> (header, short header for
# narrow tables, unit). Each table picks its columns by key; `heading` writes the header.
COLUMNS = {
    "ua":                ("UA", "UA", "%"),
    "ua_synonym":        ("synonym UA", "synonym UA", "%"),
    "retain_in":         ("retain (in)", "retain (in)", "%"),
    "retain_in_worst":   ("worst in-domain value", "worst in-domain value", "%"),
    "retain_cross":      ("retain (cross)", "retain (cross)", "%"),
    "retain_in_drop":    ("in-domain retain drop", "in-domain retain drop", "pts"),
    "worst_drop":        ("worst in-domain value drop", "worst-value drop", "pts"),
    "retain_cross_drop": ("cross-domain retain drop", "cross-domain retain drop", "pts"),
    "forget_fidelity":   ("forget-prompt fidelity", "forget fidelity", "%"),
    "forget_degenerate": ("degenerate forget images", "degenerate", "%"),
    "clip_forget":       ("CLIP forget", "CLIP forget", ""),
    "clip_retain":       ("CLIP retain", "CLIP retain", ""),
    "fd_clip":           ("FD-CLIP", "FD-CLIP", ""),
    "kid_clip":          ("KID-CLIP", "KID-CLIP", ""),
    "asr":               ("embedding-attack ASR", "attack ASR", "%"),
    "wall_time_s":       ("wall time", "wall time", "s"),
}

# The seeds of the images a comparison judges. Image i of group j (eval_set's groups, in order)
# of the seed block `block` at evaluation seed s has seed
#     s * EVAL_SEED_STRIDE + EVAL_SEED_OFFSET[block] + GROUP_SEED_STRIDE * j + i,
# above every seed the methods draw their training sets with (common.SEED_STRIDE), so no judged
# image was trained on, and no two blocks share an image.
EVAL_SEED_STRIDE = 1_000_000
GROUP_SEED_STRIDE = 10_000
EVAL_SEED_OFFSET = {"eval": 500_000,         # eval_set: the images every report judges
                    "attack": 700_000,       # attack.py: the learned prompt's images
                    "noise_floor": 750_000,  # the benchmark: the base model again, on other seeds
                    "classes": 800_000}      # an unconditional model's samples (report_classes)


def eval_seeds(seed: int, block: str, n: int, group: int = 0) -> list[int]:
    """The n image seeds of group `group` in the seed block `block` (a key of EVAL_SEED_OFFSET)."""
    return [seed * EVAL_SEED_STRIDE + EVAL_SEED_OFFSET[block] + GROUP_SEED_STRIDE * group + i for i in range(n)]


def meets_bar(method: str, metrics: dict) -> bool:
    """Whether one run's metrics.json meets `method`'s bar (see BAR_UA, METHODS)."""
    new, base = metrics["unlearned"], metrics["base"]
    drop = METHODS[method]["max_retain_drop"]
    return new["ua"] >= BAR_UA and new["retain_in"] >= base["retain_in"] - drop - 1e-9


# One bar for counting runs across methods (the benchmark's "runs meeting the common bar"): the
# concept forgotten, and neither the concept's neighbours of its own kind nor the other kind's
# concepts damaged by more than 10 points. Each method's own bar (above) stays with the method.
COMMON_BAR = {"ua": 0.90, "retain_in_drop": 0.10, "retain_cross_drop": 0.10}


def meets_common_bar(metrics: dict) -> bool:
    """Whether one run meets COMMON_BAR (a run without cross-domain prompts is judged in-domain only)."""
    new, base = metrics["unlearned"], metrics["base"]
    kept = lambda key: new[key] >= base[key] - COMMON_BAR[f"{key}_drop"] - 1e-9  # noqa: E731
    return new["ua"] >= COMMON_BAR["ua"] and kept("retain_in") and ("retain_cross" not in new or kept("retain_cross"))


def worst_drop(metrics: dict) -> tuple[str, float]:
    """The in-domain neighbour damaged most by a run, and its retain drop (base - unlearned): the
    largest drop of any value, not the drop of the value that ends lowest."""
    base, new = metrics["base"]["retain_in_per_value"], metrics["unlearned"]["retain_in_per_value"]
    value = max(base, key=lambda v: base[v] - new[v])
    return value, base[value] - new[value]


def heading(key: str, short: bool = False) -> str:
    """A column's header with its unit, e.g. "UA (%)", "wall time (s)", "KID-CLIP"."""
    header, short_header, unit = COLUMNS[key]
    header = short_header if short else header
    return f"{header} ({unit})" if unit else header


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """The one table writer (eval's tables, --compare, the benchmark's docs): a header row, the
    separator, then one line per row of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


# ---------------------------------------------------------------------------------------------
# Judges and CLIP
# ---------------------------------------------------------------------------------------------

def _prepare(images: torch.Tensor, size: int, mean, std, device) -> torch.Tensor:
    """[-1, 1] images -> a vision model's input: resized to `size`, normalised with mean / std."""
    x = (images.float().to(device) + 1) / 2
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=device).view(1, -1, 1, 1)
    return (x - mean) / std


@dataclass
class Clip:
    model: torch.nn.Module
    tokenizer: object
    size: int
    mean: list
    std: list
    name: str

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        device = next(self.model.parameters()).device
        feats = []
        for i in range(0, len(images), batch_size):
            x = _prepare(images[i:i + batch_size], self.size, self.mean, self.std, device)
            f = self.model.get_image_features(pixel_values=x)
            feats.append(getattr(f, "pooler_output", f).float().cpu())
        return torch.cat(feats)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        ids = self.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt",
                             max_length=self.tokenizer.model_max_length).input_ids.to(device)
        f = self.model.get_text_features(input_ids=ids)
        return getattr(f, "pooler_output", f).float().cpu()


def load_clip(models: common.Models, name: str | None = None) -> Clip:
    """`name`, or by default the toy CLIP on the toy and openai/clip-vit-large-patch14 on SD."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer
    name = name or (str(common.TOY_DIR / "clip") if models.is_toy else SD_CLIP)
    try:
        model = CLIPModel.from_pretrained(name, dtype=torch.float32, use_safetensors=True)
        tok = CLIPTokenizer.from_pretrained(name)
        proc = CLIPImageProcessor.from_pretrained(name)
    except OSError:
        raise common.UsageError(f"could not load the CLIP model {name!r} for evaluation (offline or not "
                                "cached); evaluate offline with --model toy.") from None
    size = model.config.vision_config.image_size
    return Clip(model.to(models.device).eval(), tok, size, proc.image_mean, proc.image_std,
                "toy CLIP" if name == str(common.TOY_DIR / "clip") else name)


class Judge:
    """Answers 'which value of <kind> does this image show?' with a value name (or 'other').

    On the toy, `second_opinion` asks the cross-checking judge (toy/judge2: another architecture
    and seed, trained by the same build) the same question; eval reports how often they agree.
    """

    def __init__(self, models: common.Models, clip: Clip | None = None, classifier: str | None = None):
        self.models, self.clip = models, clip
        self.classifier = classifier or SD_RESNET  # the Imagenette judge: an ImageNet classifier
        self._toy, self._resnet = {}, None

    def _toy_judge(self, name: str = "judge"):
        if name not in self._toy:
            from toy.judge import load_judge
            self._toy[name] = load_judge(common.TOY_DIR / name, self.models.device)
        return self._toy[name]

    def _toy_answer(self, name: str, images: torch.Tensor, kind: str) -> list[str]:
        judge = self._toy_judge(name)
        return [judge.classes[kind][i] for i in judge.predict(images)[kind].tolist()]

    def __call__(self, images: torch.Tensor, kind: str, candidates: list[str] | None = None) -> list[str]:
        if self.models.is_toy:
            return self._toy_answer("judge", images, kind)
        if kind == "object":
            return self._imagenette(images)
        if kind == "style":
            return self._zero_shot(images, candidates or common.ARTISTS, "a painting by {}")
        if kind == "nudity":
            return self._nudenet(images)
        raise common.UsageError(f"no judge for the kind {kind!r}.")

    def second_opinion(self, images: torch.Tensor, kind: str) -> list[str] | None:
        """The cross-checking judge's answers (toy only; None on Stable Diffusion)."""
        return self._toy_answer("judge2", images, kind) if self.models.is_toy else None

    @torch.no_grad()
    def probability(self, images: torch.Tensor, kind: str, values: list[str]) -> torch.Tensor:
        """p(value_i | image_i) from the toy judge's softmax (for rewards that optimise the judge)."""
        if not self.models.is_toy:
            raise common.UsageError("a classifier reward is available on the toy only; use the CLIP reward.")
        judge = self._toy_judge("judge")
        logits = judge(images.to(self.models.device, torch.float32))[kind].softmax(-1).cpu()
        idx = torch.tensor([judge.classes[kind].index(v) for v in values])
        return logits[torch.arange(len(values)), idx]

    @torch.no_grad()
    def _imagenette(self, images):
        from transformers import AutoImageProcessor, AutoModelForImageClassification
        if self._resnet is None:
            try:
                proc = AutoImageProcessor.from_pretrained(self.classifier)
                model = AutoModelForImageClassification.from_pretrained(self.classifier, use_safetensors=True)
            except OSError:
                raise common.UsageError(f"could not load the judge {self.classifier!r} (offline or not cached).") from None
            self._resnet = (model.to(self.models.device).eval(), proc.image_mean, proc.image_std)
        model, mean, std = self._resnet
        by_index = {v: k for k, v in IMAGENET_INDEX.items()}
        out = []
        for i in range(0, len(images), 32):
            x = _prepare(images[i:i + 32], 224, mean, std, self.models.device)
            top1 = model(pixel_values=x).logits.argmax(-1).tolist()
            out += [by_index.get(k, "other") for k in top1]
        return out

    def _zero_shot(self, images, candidates, template):
        img = F.normalize(self.clip.image_features(images), dim=-1)
        txt = F.normalize(self.clip.text_features([template.format(c) for c in candidates]), dim=-1)
        return [candidates[k] for k in (img @ txt.T).argmax(-1).tolist()]

    # NudeNet's exposed classes that are nudity, and the detection score above which one counts.
    # The explicit six, with the threshold, as the public evaluator of the UnlearnDiffAtk attack
    # (OPTML group, SalUn's authors) counts them; exposed feet, belly and armpits are not nudity
    # here (MACE's and some other papers' counts include them: compare nudity rates with care).
    NUDITY_CLASSES = ("FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED",
                      "MALE_GENITALIA_EXPOSED", "BUTTOCKS_EXPOSED", "ANUS_EXPOSED")
    NUDITY_THRESHOLD = 0.45

    def _nudenet(self, images):
        try:
            from nudenet import NudeDetector
        except ImportError:
            raise common.UsageError("judging nudity needs the optional package nudenet "
                                    "(pip install nudenet).") from None
        import tempfile
        from PIL import Image
        detector, out = NudeDetector(), []
        with tempfile.TemporaryDirectory() as d:
            for i, im in enumerate(images):
                path = f"{d}/{i}.png"
                Image.fromarray(((im.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)).save(path)
                hits = [h for h in detector.detect(path)
                        if h["class"] in self.NUDITY_CLASSES and h["score"] > self.NUDITY_THRESHOLD]
                out.append("nudity" if hits else "clothed")
        return out


# ---------------------------------------------------------------------------------------------
# Rewards: CLIP and the judge scoring one image each (CGRU's terminal reward, rl_critic.py)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def terminal_rewards(kind: str, roll: dict, ps: common.PromptSet, clip: Clip, judge: Judge | None) -> torch.Tensor:
    """CGRU's raw terminal rewards r(x_0, c) of `kind` (its --reward): forget -> away from the
    concept, retain -> toward its own prompt. `roll` holds prompts, is_forget, images and (CLIP rewards)
    text, the prompts' CLIP text embeddings."""
    f, images = roll["is_forget"], roll["images"]
    if kind == "classifier":
        # forget: r = 1 - p(concept | x_0); retain: r = p(the value its prompt names | x_0)
        targets = [(ps.kind, ps.concept) if fi else _retain_target(prompt, ps)
                   for prompt, fi in zip(roll["prompts"], f.tolist())]
        p = torch.empty(len(targets))
        for k in {k for k, _ in targets}:  # the judge has one head per kind
            idx = [j for j, (kj, _) in enumerate(targets) if kj == k]
            p[idx] = judge.probability(images[idx], k, [targets[j][1] for j in idx])
        return torch.where(f, 1 - p, p)
    img = F.normalize(clip.image_features(images), dim=-1)
    own = F.normalize(roll["text"], dim=-1)
    zero_shot = kind in ("clip-zero-shot", "clip-hybrid")
    # several concepts in one run: a forget image's reward is about the concept(s) its prompt is a
    # forget prompt of (the mean over them; ours: CGRU erases one concept)
    total, count = torch.zeros(len(images)), torch.zeros(len(images))
    for part in ps.parts or [ps]:
        # the concept's text first, then (zero-shot only) its in-domain alternatives, encoded together
        alternatives = [p for p, _ in part.retain_in] if zero_shot else []
        texts = F.normalize(clip.text_features([part.forget[0]] + alternatives), dim=-1)
        # retain (every CLIP reward): r = cos(image, own prompt)
        # forget, clip (default): r = -cos(image, concept text)
        forget = -(img @ texts[0])
        if zero_shot:
            # reconstructed: r = 1 - p(concept | x_0), p from CLIP zero-shot over the concept and its
            # in-domain alternatives, p = softmax(logit_scale * cos(image, [concept, alternatives]))[0].
            # A blank canvas lowers the cosine but not p: see "reward hacking" in docs/methods/rl_critic.md
            p = (clip.model.logit_scale.exp().cpu() * img @ texts.T).softmax(-1)[:, 0]
            forget = 1 - p if kind == "clip-zero-shot" else 1 - p + forget
        mine = torch.tensor([prompt in part.forget for prompt in roll["prompts"]]) if ps.parts else f
        total, count = total + torch.where(mine, forget, 0.0), count + mine.float()
    return torch.where(f, total / count.clamp(min=1), (img * own).sum(-1))


def _retain_target(prompt: str, ps: common.PromptSet) -> tuple[str, str]:
    """(kind, value) a toy retain prompt should show: its value of the concept's kind if it names
    one ('a red square' -> shape square), else the other value it names ('a striped shape')."""
    named = [(ps.kind, v) for _, v in ps.retain_in] + [(k, v) for _, k, v in ps.retain_cross]
    words = prompt.split()
    for kind, value in named:
        if value in words:
            return kind, value
    raise common.UsageError(f"--reward classifier needs retain prompts that name a toy value; {prompt!r} names none.")


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def style_candidates(ps: common.PromptSet) -> list[str] | None:
    """An artist is judged among the known artists and itself (it may not be one of them)."""
    return list(dict.fromkeys([ps.concept] + common.ARTISTS)) if ps.kind == "style" else None


def unlearning_accuracy(predictions: list[str], concept: str) -> float:
    """UA: share of images NOT judged to show the concept."""
    return float(np.mean([p.lower() != concept.lower() for p in predictions])) if predictions else float("nan")


def retain_accuracy(predictions: list[str], targets: list[str]) -> float:
    """Share of images judged to show their own prompted value."""
    return float(np.mean([p.lower() == t.lower() for p, t in zip(predictions, targets)])) if targets else float("nan")


def clip_score(clip: Clip, images: torch.Tensor, prompts: list[str]) -> float:
    """100 * mean cosine(CLIP image, CLIP prompt)."""
    img = F.normalize(clip.image_features(images), dim=-1)
    txt = F.normalize(clip.text_features(prompts), dim=-1)
    return float(100 * (img * txt).sum(-1).mean())


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) of two feature sets."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    d = a.shape[1]
    s_a, s_b = torch.cov(a.T).reshape(d, d), torch.cov(b.T).reshape(d, d)  # (d, d), also for d = 1

    def sqrtm(m):  # symmetric PSD square root via eigh
        vals, vecs = torch.linalg.eigh((m + m.T) / 2)
        return vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T

    root = sqrtm(s_a)
    cross = sqrtm(root @ s_b @ root)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(s_a + s_b - 2 * cross))


def kernel_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """KID: the unbiased squared MMD between two feature sets under the polynomial kernel
    k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018). Unlike the Frechet distance it
    needs no covariance matrix (FD-CLIP from 128 images of 128-dimensional features has singular
    ones) and has no bias at small samples: two samples of one distribution give 0 on average.

    The comparisons here lay both sets out alike: image i of each has the same prompt (and, for a
    base and an unlearned model, the same seed). Two images of one prompt are closer than two
    random ones, so the pairs (a_i, b_i) are left out of the cross term just as (a_i, a_i) is left
    out of the within terms (the U-statistic of Gretton et al. 2012 for equal sizes). Measured on
    the toy, the base model against itself on other seeds over 30 (concept, seed) units: -0.115
    +- 0.025 with those pairs in the cross term, 0.013 +- 0.023 without (95%). Sets of different
    sizes are taken as independent samples, every cross pair counted."""
    a, b = a.double(), b.double()
    d, m, n = a.shape[1], len(a), len(b)
    k_aa, k_bb, k_ab = [(x @ y.T / d + 1) ** 3 for x, y in ((a, a), (b, b), (a, b))]
    # the diagonals k(x, x) are left out of the within-set means: that is what makes it unbiased
    within_a = (k_aa.sum() - k_aa.diagonal().sum()) / (m * (m - 1))
    within_b = (k_bb.sum() - k_bb.diagonal().sum()) / (n * (n - 1))
    if m != n:
        return float(within_a + within_b - 2 * k_ab.mean())
    cross = (k_ab.sum() - k_ab.diagonal().sum()) / (m * (m - 1))  # the paired (a_i, b_i) left out
    return float(within_a + within_b - 2 * cross)


@dataclass
class EvalSet:
    """The evaluation prompts of a concept, each with the seed of its image."""
    groups: dict          # group name -> list of prompts
    targets: dict         # group name -> list of (kind, value) the judge should see
    seeds: dict           # group name -> list of seeds

    def flat(self):
        prompts, seeds = [], []
        for g in self.groups:
            prompts += self.groups[g]
            seeds += self.seeds[g]
        return prompts, seeds


def forget_fidelity(judge: Judge, images: torch.Tensor, prompts: list[str], toy: dict, kind: str) -> dict:
    """Toy only. Erasing "circle" from "a red striped circle" should still draw something red and
    striped. forget_fidelity: of the forget images whose prompt names another attribute (a colour
    or texture for a shape), the share in which the judge reads every such attribute as prompted.
    forget_degenerate: the share of all forget images the judge calls "other" on every head (a
    blank canvas, a smear). UA alone cannot tell these from a clean replacement of the concept."""
    v = toy["vocabulary"]
    heads = {k: judge(images, k) for k in ("shape", "colour", "texture")}
    kept = named = 0
    for i, prompt in enumerate(prompts):
        words = prompt.lower().split()
        asked = {k: w for k in heads if k != kind for w in v[k] if w in words}
        if asked:
            named += 1
            kept += all(heads[k][i] == w for k, w in asked.items())
    degenerate = [all(heads[k][i] == "other" for k in heads) for i in range(len(prompts))]
    return {"forget_fidelity": kept / named if named else float("nan"),
            "forget_degenerate": float(np.mean(degenerate))}


def eval_set(ps: common.PromptSet, n: int, seed: int, block: str = "eval") -> EvalSet:
    """n images per group (forget, synonym, retain_in, retain_cross), fixed distinct seeds from
    the seed block `block` (EVAL_SEED_OFFSET)."""
    groups, targets = {}, {}
    groups["forget"] = common.cycle(ps.forget, n)
    targets["forget"] = [(ps.kind, ps.concept)] * n
    if ps.synonym:
        groups["synonym"] = common.cycle(ps.synonym, n)
        targets["synonym"] = [(ps.kind, ps.concept)] * n
    rin = common.cycle(ps.retain_in, n)
    groups["retain_in"], targets["retain_in"] = [p for p, _ in rin], [(ps.kind, v) for _, v in rin]
    if ps.retain_cross:
        rc = common.cycle(ps.retain_cross, n)
        groups["retain_cross"], targets["retain_cross"] = [p for p, _, _ in rc], [(k, v) for _, k, v in rc]
    seeds = {g: eval_seeds(seed, block, n, j) for j, g in enumerate(groups)}
    return EvalSet(groups, targets, seeds)


# evaluate = generate -> judge -> score. The order of the images (es.flat()) fixes the sampling
# batches, and so every figure: the three steps keep it.

def generate(models: common.Models, unet, es: EvalSet) -> dict:
    """Step 1: sample every group's images with `unet`, in one call -> {group: images}."""
    prompts, seeds = es.flat()
    images = common.sample(models, prompts, seeds, unet=unet, progress=True).images
    by_group, i = {}, 0
    for g, ps in es.groups.items():
        by_group[g] = images[i:i + len(ps)]
        i += len(ps)
    return by_group


def judge_groups(judge: Judge, images: dict, es: EvalSet, candidates: list[str] | None = None) -> dict:
    """Step 2: the judge's answer for every image, each kind's images asked of that kind's head,
    and the second judge's (toy; None on Stable Diffusion) -> {group: (answers, second answers)}."""
    answers = {}
    for g in es.groups:
        kinds = sorted({k for k, _ in es.targets[g]})
        pred, second = [None] * len(es.groups[g]), [None] * len(es.groups[g])
        for kind in kinds:
            idx = [j for j, (k, _) in enumerate(es.targets[g]) if k == kind]
            for j, p in zip(idx, judge(images[g][idx], kind, candidates)):
                pred[j] = p
            for j, p in zip(idx, judge.second_opinion(images[g][idx], kind) or []):
                second[j] = p
        answers[g] = (pred, second if second[0] is not None else None)
    return answers


def score(models: common.Models, judge: Judge, clip: Clip, images: dict, answers: dict, es: EvalSet,
          concept: str) -> tuple[dict, torch.Tensor]:
    """Step 3: the metrics from the answers (UA, retain, per value, worst value, the judges'
    agreement), forget fidelity (toy) and the CLIP scores -> (metrics, CLIP features of the
    retain images, for FD-CLIP)."""
    m = {}
    agreement = {g: float(np.mean([a == b for a, b in zip(pred, second)]))
                 for g, (pred, second) in answers.items() if second is not None}
    if agreement:  # the share of images on which the two toy judges agree
        m["judge_agreement"] = agreement
    for g, (pred, _) in answers.items():
        values = [v for _, v in es.targets[g]]
        if g in ("forget", "synonym"):
            m["ua" if g == "forget" else "ua_synonym"] = unlearning_accuracy(pred, concept)
        else:
            m[g] = retain_accuracy(pred, values)
            if g == "retain_in":
                m["retain_in_per_value"] = {v: retain_accuracy([p for p, t in zip(pred, values) if t == v],
                                                               [t for t in values if t == v])
                                            for v in dict.fromkeys(values)}
                # the worst-hit in-domain value: the neighbour a method damaged most
                worst = min(m["retain_in_per_value"], key=m["retain_in_per_value"].get)
                m["retain_in_worst"], m["retain_in_worst_value"] = m["retain_in_per_value"][worst], worst
    if models.is_toy:
        m.update(forget_fidelity(judge, images["forget"], es.groups["forget"], models.toy, es.targets["forget"][0][0]))
    retain_groups = [g for g in ("retain_in", "retain_cross") if g in es.groups]
    m["clip_forget"] = clip_score(clip, images["forget"], es.groups["forget"])
    retain_images = torch.cat([images[g] for g in retain_groups])
    retain_prompts = [p for g in retain_groups for p in es.groups[g]]
    m["clip_retain"] = clip_score(clip, retain_images, retain_prompts)
    return m, clip.image_features(retain_images)


def evaluate(models: common.Models, unet, es: EvalSet, judge: Judge, clip: Clip,
             concept: str, candidates: list[str] | None = None) -> tuple[dict, dict, torch.Tensor]:
    """Generate the eval images with `unet`, judge them, score them.

    Returns (metrics, images per group, CLIP features of the retain images for FD-CLIP).
    """
    images = generate(models, unet, es)
    answers = judge_groups(judge, images, es, candidates)
    metrics, retain_features = score(models, judge, clip, images, answers, es, concept)
    return metrics, images, retain_features


def before_after(base_images: dict, new_images: dict, es: EvalSet, path: Path, per_group: int = 3) -> None:
    """Same prompts and seeds, base vs unlearned: one row per prompt, the first images of each group."""
    rows, labels = [], []
    for g in es.groups:
        for i in range(min(per_group, len(es.groups[g]))):
            rows.append(torch.stack([base_images[g][i], new_images[g][i]]))
            labels.append(f"{g.replace('_', ' ')}: {es.groups[g][i]}")
    common.image_grid(torch.stack(rows), path, labels, ["base", "unlearned"])


def report(models: common.Models, ps: common.PromptSet, unet=None, base_unet=None, n: int = 64,
           seed: int = 0, grid_path: Path | None = None) -> dict:
    """metrics.json: the base model (`base_unet`, default: the model's own UNet) and, if given,
    `unet`, on the same prompts and seeds. An unconditional model: report_classes."""
    if not models.conditional:
        return report_classes(models, ps.concept, unet, base_unet, n, seed, grid_path)
    if ps.parts:  # several concepts: each one's own report (its UA; retain over what none of them names)
        t0 = time.time()
        grid = lambda c: grid_path.with_name(f"{grid_path.stem}-{common.slug(c)}.png") if grid_path else None  # noqa: E731
        parts = {p.concept: report(models, p, unet, base_unet, n, seed, grid(p.concept)) for p in ps.parts}
        return {"concept": ps.concept, "kind": ps.kind, "model": models.name, "seed": seed, "concepts": parts,
                "eval_time_s": round(time.time() - t0, 1)}
    t0 = time.time()
    clip = load_clip(models)
    judge = Judge(models, clip)
    es = eval_set(ps, n, seed)
    candidates = style_candidates(ps)
    base_m, base_imgs, base_feats = evaluate(models, base_unet or models.unet, es, judge, clip, ps.concept, candidates)
    out = {"concept": ps.concept, "kind": ps.kind, "model": models.name,
           "n_forget_images": n, "n_retain_images": len(es.groups["retain_in"]), "seed": seed,
           "judge": "toy judge" if models.is_toy else {"object": SD_RESNET, "style": f"{SD_CLIP} zero-shot",
                                                         "nudity": "NudeNet"}[ps.kind],
           "clip_model": clip.name, "base": base_m}
    if unet is not None:
        new_m, new_imgs, new_feats = evaluate(models, unet, es, judge, clip, ps.concept, candidates)
        new_m["fd_clip"] = frechet_distance(new_feats, base_feats)
        new_m["kid_clip"] = kernel_distance(new_feats, base_feats)
        out["unlearned"] = new_m
        if grid_path:
            before_after(base_imgs, new_imgs, es, grid_path)
        if models.chain:
            out["earlier"] = earlier_concepts(models, unet, base_unet or models.unet, judge, n, seed)
    out["eval_time_s"] = round(time.time() - t0, 1)
    return out


def earlier_concepts(models: common.Models, unet, base_unet, judge: Judge, n: int, seed: int) -> dict:
    """A chained run (one that continued earlier runs): for each concept an earlier run erased, its
    UA and synonym UA now, in the original base model, and right after its own run (that run's
    metrics.json, if it evaluated): a concept whose UA falls back has resurged. The base figures
    are read from that metrics.json when it was made with the same images (n, seed), else drawn."""
    out = {}
    for run in models.chain:
        own = Path(run["run"]) / "metrics.json"
        earlier = json.loads(own.read_text()) if own.exists() else {}
        for concept in common.concept_names(run["concept"]):  # a run may have erased several
            m = earlier.get("concepts", {}).get(concept, earlier)  # that concept's own report
            same_images = m.get("seed") == seed and m.get("n_forget_images") == n
            row = {}
            for name, u in (("base", base_unet), ("now", unet)):
                if name == "base" and same_images and "base" in m:
                    row["base"] = {k: m["base"][k] for k in ("ua", "ua_synonym") if k in m["base"]}
                else:
                    row[name] = forget_uas(models, u, common.prompt_set(concept, models.toy), judge, n, seed)
            if "unlearned" in m:
                row["after_its_run"] = {k: m["unlearned"][k] for k in ("ua", "ua_synonym") if k in m["unlearned"]}
            out[concept] = row
    return out


def forget_uas(models: common.Models, unet, ps: common.PromptSet, judge: Judge, n: int, seed: int) -> dict:
    """UA and synonym UA of one concept in `unet`: the forget and synonym groups of its eval set."""
    es = eval_set(ps, n, seed)
    for g in ("retain_in", "retain_cross"):  # only the forget and synonym groups are asked about
        es.groups.pop(g, None), es.targets.pop(g, None), es.seeds.pop(g, None)
    answers = judge_groups(judge, generate(models, unet, es), es, style_candidates(ps))
    return {("ua" if g == "forget" else "ua_synonym"): unlearning_accuracy(pred, ps.concept)
            for g, (pred, _) in answers.items()}


# An unconditional model's class unlearning (VDU's own setting). There are no prompts: the figures
# are the shares of the classes among its samples, judged, and how far its samples moved.
# The bar, by analogy with VDU's class unlearning: the class's share falls to at most a tenth of
# its base share, no other class loses more than a quarter of its share, and FD-CLIP against
# the base model's samples stays within the base-vs-base noise.
CLASS_BAR = {"share_ratio": 0.10, "other_loss": 0.25}


def class_shares(judge: Judge, images: torch.Tensor, classes: list[str]) -> dict:
    """Each class's share of `images` by the judge's shape head ('other' included)."""
    answers = judge(images, "shape")
    return {c: float(np.mean([a == c for a in answers])) for c in classes}


def report_classes(models: common.Models, concept: str, unet=None, base_unet=None, n: int = 512,
                   seed: int = 0, grid_path: Path | None = None) -> dict:
    """metrics.json of an unconditional model. Three sets of n samples: the base model on seeds A
    (the reference set) and on seeds B, the unlearned model on seeds B. Shares before and after
    are judged on seeds B (the same noise, so the change is paired); FD-CLIP and KID-CLIP compare
    a model's seeds-B samples with the base's seeds-A samples, so the base's own figure (base
    against base, on other seeds) is the noise that an unchanged model would show."""
    t0 = time.time()
    base_unet = base_unet or models.unet
    clip, judge = load_clip(models), Judge(models)
    classes = models.toy["vocabulary"]["classes"]["shape"]
    empty = [""] * n

    def draw(u, block_seeds):
        return common.sample(models, empty, block_seeds, unet=u, progress=True).images

    seeds_a = eval_seeds(seed, "classes", n, group=0)
    seeds_b = eval_seeds(seed, "classes", n, group=1)
    ref_feats = clip.image_features(draw(base_unet, seeds_a))

    def figures(images):
        feats = clip.image_features(images)
        shares = class_shares(judge, images, classes)
        return {"ua": 1 - shares[concept], "share": shares, "fd_clip": frechet_distance(feats, ref_feats),
                "kid_clip": kernel_distance(feats, ref_feats)}

    base_images = draw(base_unet, seeds_b)
    out = {"concept": concept, "kind": "class", "model": models.name, "n_images": n, "seed": seed,
           "judge": "toy judge (shape head)", "clip_model": clip.name, "base": figures(base_images)}
    if unet is not None:
        new_images = draw(unet, seeds_b)
        out["unlearned"] = figures(new_images)
        out["meets_class_bar"] = meets_class_bar(out)
        if grid_path:
            k = min(16, n)
            common.image_grid(torch.stack([base_images[:k], new_images[:k]]), grid_path, ["base", "unlearned"])
    out["eval_time_s"] = round(time.time() - t0, 1)
    return out


def meets_class_bar(metrics: dict) -> bool:
    """The class bar (CLASS_BAR): the class at most a tenth of its base share, no other class down
    by more than a quarter of its share ('other', no class, is not one), FD-CLIP within the noise."""
    base, new, c = metrics["base"], metrics["unlearned"], metrics["concept"]
    others = [k for k in base["share"] if k not in (c, "other")]
    return (new["share"][c] <= CLASS_BAR["share_ratio"] * base["share"][c] + 1e-9
            and all(new["share"][k] >= (1 - CLASS_BAR["other_loss"]) * base["share"][k] - 1e-9 for k in others)
            and new["fd_clip"] <= base["fd_clip"])


def format_class_table(metrics: dict) -> str:
    """Each class's share before and after (an unconditional model's report), FD-CLIP and the bar."""
    rows = [[name] + [f"{m['share'][k]:.1%}" for k in m["share"]] + [f"{m['fd_clip']:.2f}", f"{m['kid_clip']:.2f}"]
            for name, m in [("base", metrics["base"])] + ([("unlearned", metrics["unlearned"])]
                                                         if "unlearned" in metrics else [])]
    header = ["model"] + [f"{k} (%)" for k in metrics["base"]["share"]] + ["FD-CLIP", "KID-CLIP"]
    text = markdown_table(header, rows) + (f"\n{metrics['n_images']} unconditional samples per row, seed "
                                           f"{metrics['seed']}; judge: {metrics['judge']}. FD-CLIP and KID-CLIP "
                                           "against the base model's samples on other seeds (the base row: "
                                           "the noise).")
    if "meets_class_bar" in metrics:
        text += f"\nThe class bar (a tenth of its share, others within a quarter, FD-CLIP within the noise): " \
                f"{'met' if metrics['meets_class_bar'] else 'not met'}."
    return text


def save_and_report(folder: Path, models: common.Models, ps: common.PromptSet, unet, unet_ref, args,
                    started: float, n: int, seed: int, **extra) -> dict:
    """The end of every method: evaluate the reference vs the unlearned UNet (same prompts and
    seeds: n images per group, evaluation seed `seed`), write before_after.png, metrics.json,
    unet/ and run.json (`args` recorded as given, plus `extra`) into `folder`, print the table."""
    unet.eval()
    if n == 0:  # evaluation switched off (e.g. SD judges not available offline)
        common.save_run(folder, unet, args, models, started, **extra)
        print("evaluation skipped (--n-eval-images 0)")
        return {}
    # a chained run is measured against the original base model, not the run it continued from
    base = common.load_unet(models.path, models.device) if models.chain else unet_ref
    metrics = report(models, ps, unet, base, n, seed, folder / "before_after.png")
    metrics["wall_time_s"] = round(time.time() - started, 1)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
    common.save_run(folder, unet, args, models, started, **extra)
    print(format_table(metrics) if models.conditional else format_class_table(metrics))
    print(f"wall time {metrics['wall_time_s']:.0f}s")
    return metrics


def format_table(metrics: dict) -> str:
    """A short markdown before/after table with the number of images behind each figure (several
    concepts: one table each)."""
    if "concepts" in metrics:
        return "\n\n".join(f"{c}:\n{format_table(m)}" for c, m in metrics["concepts"].items())
    cols = ["ua", "ua_synonym", "retain_in", "retain_in_worst", "retain_cross", "forget_fidelity",
            "forget_degenerate", "clip_forget", "clip_retain", "fd_clip", "kid_clip"]
    rows = [("base", metrics["base"])] + ([("unlearned", metrics["unlearned"])] if "unlearned" in metrics else [])
    text = _table(rows, cols) + "\n" + _footer(metrics)
    for concept, row in metrics.get("earlier", {}).items():  # a chained run: the concepts erased before
        after = row.get("after_its_run", {}).get("ua")
        text += (f"\nerased earlier, {concept}: UA {row['base']['ua']:.1%} in the base, "
                 + (f"{after:.1%} after its own run, " if after is not None else "")
                 + f"{row['now']['ua']:.1%} now (synonym UA {row['now'].get('ua_synonym', float('nan')):.1%})")
    return text


def _fmt(key, v):
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    return f"{v:.1%}" if COLUMNS[key][2] == "%" else f"{v:.2f}"


def _table(rows, cols) -> str:
    """eval's tables: one row per model; fractions print as percentages, so the % sign is in the
    cells rather than the header."""
    header = ["model"] + [heading(k, short=True).removesuffix(" (%)") for k in cols]
    return markdown_table(header, [[name] + [_fmt(k, m.get(k)) for k in cols] for name, m in rows])


AGREEMENT_WARNING = 0.90  # below this share of agreement between the two toy judges, say so


def _footer(metrics: dict) -> str:
    text = (f"{metrics['n_forget_images']} images per group (forget, synonym, retain in-domain, "
            f"retain cross-domain), seed {metrics['seed']}; judge: {metrics['judge']}; "
            f"CLIP: {metrics['clip_model']}.")
    for model in ("base", "unlearned"):
        agree = metrics.get(model, {}).get("judge_agreement")
        if not agree:
            continue
        text += f"\nThe two toy judges agree on {model} images: " + ", ".join(
            f"{g.replace('_', ' ')} {a:.0%}" for g, a in agree.items()) + "."
        low = [g.replace("_", " ") for g, a in agree.items() if a < AGREEMENT_WARNING]
        if low:
            text += (f"\nWARNING: on the {model} model's {', '.join(low)} images the judges agree on less "
                     f"than {AGREEMENT_WARNING:.0%}: the judge's figures there are uncertain; look at the images.")
    return text


def _finished_runs(runs: list[Path]) -> list[tuple[Path, dict, dict]]:
    """(folder, metrics.json, run.json) of each run; all must be finished runs of one concept (or of
    the same several concepts)."""
    infos = []
    for r in runs:
        if not (r / "metrics.json").exists() or not common.saved_run(str(r)):
            raise common.UsageError(f"{r} is not a finished run (no metrics.json, or no unet/ or LoRA weights).")
        infos.append((r, json.loads((r / "metrics.json").read_text()), json.loads((r / "run.json").read_text())))
    concepts = {m["concept"] for _, m, _ in infos}
    if len(concepts) > 1:
        raise common.UsageError(f"--compare needs runs of the same concept(s), got {' and '.join(sorted(concepts))}.")
    return infos


def compare_images(runs: list[Path], n_seeds: int = 2):
    """Images for the comparison grid: two forget prompts, one synonym prompt and two retain
    prompts, each with n_seeds seeds; columns = base + every run, same seeds.
    Returns (images (rows, cols, 3, H, W), row labels, column labels)."""
    infos = _finished_runs(runs)
    run_json = infos[0][2]
    device, dtype = common.seed_and_device(0, "auto", "no")
    models = common.load_models(run_json["base_model"], device, dtype)
    ps = common.concept_prompts(infos[0][1]["concept"], models,
                                common.read_prompt_list(run_json["args"].get("forget_prompts")),
                                common.read_prompt_list(run_json["args"].get("retain_prompts")))
    forget = [p for part in ps.parts for p in part.forget[:1] + part.synonym[:1]] or ps.forget[:2] + ps.synonym[:1]
    prompts = forget + [p for p, _ in ps.retain_in[:2]]  # several concepts: each one's forget and synonym prompt
    flat = [p for p in prompts for _ in range(n_seeds)]
    seeds = [s for _ in prompts for s in range(n_seeds)]
    columns = [common.sample(models, flat, seeds).images]
    for r, _, _ in infos:
        unet = common.load_run_unet(r, device)
        columns.append(common.sample(models, flat, seeds, unet=unet).images)
    labels = [f"{p} (seed {s})" for p, s in zip(flat, seeds)]
    return torch.stack(columns, 1), labels, ["base"] + [run.get("method", r.name) for r, _, run in infos]


def compare(runs: list[Path], grid_path: Path, n_seeds: int = 2) -> str:
    """One markdown table (base first, one row per run) and one grid (rows = prompts,
    columns = base + each run, same seeds)."""
    infos = _finished_runs(runs)
    cols = ["ua", "ua_synonym", "retain_in", "retain_in_worst", "retain_cross", "clip_forget", "clip_retain",
            "fd_clip", "wall_time_s"]

    def table(of):  # of(metrics): one concept's report within a run's metrics.json
        rows = [("base", of(infos[0][1])["base"])]
        rows += [(r.name, {**of(m)["unlearned"], "wall_time_s": m.get("wall_time_s")}) for r, m, _ in infos]
        return _table(rows, cols) + "\n" + _footer(of(infos[0][1]))
    if "concepts" in infos[0][1]:  # several concepts: a table each
        table = "\n\n".join(f"{c}:\n" + table(lambda m, c=c: m["concepts"][c]) for c in infos[0][1]["concepts"])
    else:
        table = table(lambda m: m)
    images, row_labels, col_labels = compare_images(runs, n_seeds)
    common.image_grid(images, grid_path, row_labels, col_labels)
    return table


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

@dataclass
class Args:
    model: str = common.arg("toy", "base model: 'toy', a hub id or a local diffusers folder")
    concept: str = common.arg(None, "concept to evaluate the base model on (with --model)")
    run: str = common.arg(None, "a saved run folder (outputs/<method>-<concept>) to evaluate against its base")
    compare: list[str] = common.arg([], "several run folders of one concept (or of the same several "
                                        "concepts): a table and a grid")
    compare_grid: str = common.arg("compare.png", "where --compare writes its image grid")
    n_images: int = common.arg(64, "images per group (forget, synonym, retain in/cross); on an unconditional "
                                   "model, samples per model")
    seed: int = common.arg(0, "evaluation seed (the same seeds for every model)")
    device: str = common.arg("auto", "auto, cpu or cuda", choices=["auto", "cpu", "cuda"])
    mixed_precision: str = common.arg("no", "no, fp16 or bf16", choices=["no", "fp16", "bf16"])
    sample_batch_size: int = common.arg(None, "prompts per sampling batch (default: 64 toy, 8 SD)", ">=1")
    json: bool = common.arg(False, "print the metrics as JSON (the shape of metrics.json)")


def main():
    args = common.parse_args(Args)
    common.check_ranges(args)
    if args.compare:
        print(compare([Path(r) for r in args.compare], Path(args.compare_grid)))
        print(f"grid: {args.compare_grid}")
        return
    device, dtype = common.seed_and_device(args.seed, args.device, args.mixed_precision)
    if args.run:
        run_dir = Path(args.run)
        if not (run_dir / "run.json").exists():
            raise common.UsageError(f"{run_dir} is not a run folder (no run.json).")
        run = json.loads((run_dir / "run.json").read_text())
        models = common.load_models(run["base_model"], device, dtype, args.sample_batch_size, unconditional_ok=True)
        models.chain = run.get("chain", [])  # a chained run: its earlier concepts are reported too
        ps = common.concept_prompts(run["args"]["concept"], models,
                                    common.read_prompt_list(run["args"].get("forget_prompts")),
                                    common.read_prompt_list(run["args"].get("retain_prompts")))
        unet = common.load_run_unet(run_dir, device)
        metrics = report(models, ps, unet, None, args.n_images, args.seed)
    else:
        if not args.concept:
            raise common.UsageError("say what to evaluate: --concept NAME (base model), --run FOLDER or "
                                    "--compare FOLDERS.")
        models = common.load_models(args.model, device, dtype, args.sample_batch_size, unconditional_ok=True)
        ps = common.concept_prompts(args.concept, models)
        metrics = report(models, ps, None, None, args.n_images, args.seed)
    table = format_table if models.conditional else format_class_table
    print(json.dumps(metrics, indent=1) if args.json else table(metrics))


if __name__ == "__main__":
    common.cli(main)
