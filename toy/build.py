"""Build the toy world's models: `python -m toy.build` (about an hour on 2 CPU cores).

Trains, in order, and saves in standard formats under toy/:
  1. a CLIP tokenizer for the toy vocabulary                        -> pipeline/tokenizer, clip/
  2. a tiny CLIP (transformers CLIPModel), contrastive               -> clip/, pipeline/text_encoder
  3. a tiny AutoencoderKL, 32x32x3 <-> 8x8x4, scaling factor measured -> pipeline/vae
  4. a UNet2DConditionModel on 8x8x4 latents, cross-attending to the frozen CLIP text states,
     SD's scheduler (1000 steps, scaled-linear 0.00085..0.012, epsilon), EMA weights
                                                                    -> pipeline/unet
  5. two judges (toy/judge.py), CNNs with shape / colour / texture heads, trained on clean and
     deliberately degraded renders -> judge/ (the one eval reports), judge2/ (cross-check)
  6. snapshot UNets from short continued training with other seeds (for VDU)  -> snapshots/
then measures the quality figures (judge accuracy, base-model accuracy per value, unconditional
prior, CLIP retrieval, sampling speed) and writes them with the vocabulary and the recommended
sampling settings to toy/toy.json. Deterministic for a given --seed on a given device.
Weights are stored in float16 to keep the committed artifacts small; they load as float32.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import common
from toy import world
from toy.judge import HEADS, Judge, load_judge

HERE = Path(__file__).resolve().parent
MAX_TOKENS = 16          # toy captions are at most 6 words; SD uses 77
RECOMMENDED = {"num_inference_steps": 20, "guidance_scale": 5.0}
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1)
STEPS = {"clip": 1500, "vae": 2500, "unet": 8000, "judge": 1500, "snapshot": 200}


def log(msg: str) -> None:
    tqdm.write(msg)


def cosine_lr(opt, total: int, warmup: int = 100, floor: float = 0.1):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


# ------------------------------------------------------------------------------------------
# 1. Tokenizer
# ------------------------------------------------------------------------------------------

def build_tokenizer(folder: Path):
    """A standard CLIPTokenizer whose BPE merges spell each toy word as one token.

    The vocabulary holds the letters (alone and word-final) plus, for every toy word, the chain
    of merges that builds it left to right, so every toy word is exactly one token and any other
    word falls apart into letters (common.py rejects such words with a clear error).
    """
    from transformers import CLIPTokenizer
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for tok in letters + [c + "</w>" for c in letters]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []

    def bpe(word):  # CLIP's rule: repeatedly merge the adjacent pair with the lowest rank
        pieces, rank = list(word[:-1]) + [word[-1] + "</w>"], {m: i for i, m in enumerate(merges)}
        while len(pieces) > 1:
            pairs = [(rank.get((a, b), 1e9), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
            best, i = min(pairs)
            if best == 1e9:
                break
            pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2:]
        return pieces

    # Append merges until every toy word is one token (a merge added for one word can split
    # another, so repeat to a fixed point).
    for _ in range(20):
        split = [w for w in world.all_words() if len(bpe(w)) > 1]
        if not split:
            break
        for word in split:
            pieces = bpe(word)
            while len(pieces) > 1:
                merges.append((pieces[0], pieces[1]))
                pieces = [pieces[0] + pieces[1]] + pieces[2:]
                vocab.setdefault(pieces[0], len(vocab))
    merges = [f"{a} {b}" for a, b in dict.fromkeys(merges)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                        model_max_length=MAX_TOKENS)
    tok.save_pretrained(folder)
    tok = CLIPTokenizer.from_pretrained(folder)
    for word in world.all_words():
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, f"toy word {word!r} tokenized as {ids}"
    return tok


def tokenize(tok, captions):
    return tok(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
               return_tensors="pt").input_ids


# ------------------------------------------------------------------------------------------
# 2. CLIP
# ------------------------------------------------------------------------------------------

def full_caption(labels: world.Labels, i: int, rng) -> str:
    s, c, t = world.SHAPES[labels.shape[i]], world.COLOURS[labels.colour[i]], world.TEXTURES[labels.texture[i]]
    if rng.random() < world.P_SYNONYM:
        s = world.SHAPE_SYNONYMS[s]
    if rng.random() < world.P_SYNONYM:
        t = world.TEXTURE_SYNONYMS[t]
    return world.caption(s, c, t)


def train_clip(tok, steps: int, device, seed: int):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 2])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=128, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, projection_dim=128),
        vision_config=dict(image_size=32, patch_size=8, num_channels=3, hidden_size=128,
                           intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                           projection_dim=128),
        projection_dim=128)
    clip = CLIPModel(config).to(device).train()
    opt = torch.optim.AdamW(clip.parameters(), lr=1e-3, weight_decay=0.05)
    sched = cosine_lr(opt, steps)
    bar = tqdm(range(steps), desc="2/6 CLIP", mininterval=5)
    for step in bar:
        images, captions, labels = world.sample(rng, 128, p_named=0.85, drop=False)
        named = labels.shape < len(world.SHAPES)
        captions = [full_caption(labels, i, rng) if named[i] and rng.random() < 0.5 else c
                    for i, c in enumerate(captions)]
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32,
                            device=device)
        target = same / same.sum(1, keepdim=True)
        out = clip(input_ids=tokenize(tok, captions).to(device),
                   pixel_values=torch.from_numpy(images).to(device))
        logits = out.logits_per_image
        # symmetric InfoNCE with soft targets (identical captions are all positives)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return clip.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------
# 3. VAE
# ------------------------------------------------------------------------------------------

def train_vae(steps: int, device, seed: int):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 3])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
                        down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(32, 64, 64), layers_per_block=1,
                        norm_num_groups=16).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = cosine_lr(opt, steps)
    bar = tqdm(range(steps), desc="3/6 VAE", mininterval=5)
    for step in bar:
        images, _, _ = world.sample(rng, 32)
        x = torch.from_numpy(images).to(device)
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        # reconstruction (L2 + L1 keeps fine textures sharp) + a small KL, as SD's VAE
        kl = posterior.kl().mean() / 256
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl.item():.2f}")
    vae.eval().requires_grad_(False)
    # SD's scaling factor makes the latents unit-variance: measure it on fresh data
    with torch.no_grad():
        images, _, _ = world.sample(np.random.default_rng([seed, 30]), 1024)
        z = torch.cat([vae.encode(torch.from_numpy(images[i:i + 256]).to(device)).latent_dist.sample()
                       for i in range(0, 1024, 256)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return vae


# ------------------------------------------------------------------------------------------
# 4. UNet (and 6. snapshots)
# ------------------------------------------------------------------------------------------

UNET_CHANNELS = (32, 64, 128)
UNET_LAYOUT = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=16)


def make_unet(channels=UNET_CHANNELS):
    """SD's UNet layout (cross-attention down/up blocks around a plain bottom level), shrunk."""
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        **UNET_LAYOUT, block_out_channels=tuple(channels),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=4)


class TextCache:
    """Frozen CLIP text-tower hidden states per caption (the toy has only a few hundred)."""

    def __init__(self, tok, text_encoder, device):
        self.tok, self.te, self.device, self.cache = tok, text_encoder, device, {}

    @torch.no_grad()
    def __call__(self, captions):
        new = sorted({c for c in captions if c not in self.cache})
        if new:
            states = self.te(tokenize(self.tok, new).to(self.device))[0]
            self.cache.update(zip(new, states))
        return torch.stack([self.cache[c] for c in captions])


def train_unet(unet, vae, text, steps: int, device, seed: int, lr: float, desc: str, ema_decay=None):
    """Denoising training on the VAE's latents of world.sample's images. text=None trains an
    unconditional UNet2DModel (section 7) on named content only, each shape in equal shares."""
    from diffusers import DDPMScheduler
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 4])
    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k not in ("steps_offset", "set_alpha_to_one")})
    abar = noise_sched.alphas_cumprod.to(device)
    unet.to(device).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    sched = cosine_lr(opt, steps, warmup=min(200, steps // 10 + 1))
    ema = None
    if ema_decay:
        ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    bar = tqdm(range(steps), desc=desc, mininterval=5)
    for step in bar:
        images, captions, _ = world.sample(rng, 64) if text else world.sample(rng, 64, p_named=1.0, drop=False)
        with torch.no_grad():
            x0 = vae.encode(torch.from_numpy(images).to(device)).latent_dist.sample()
            x0 = x0 * vae.config.scaling_factor
        t = torch.randint(0, 1000, (len(x0),), device=device)
        eps = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = unet(x_t, t, encoder_hidden_states=text(captions)).sample if text else unet(x_t, t).sample
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            d = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, v in unet.state_dict().items():
                    ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    if ema is not None:
        unet.load_state_dict(ema)
    return unet.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------
# 5. Judge
# ------------------------------------------------------------------------------------------

def judge_batch(rng, n):
    """Clean procedural images with labels: 60% named content, so every class is well represented."""
    images, _, labels = world.sample(rng, n, p_named=0.6, drop=False)
    return images, {"shape": labels.shape, "colour": labels.colour, "texture": labels.texture}


IGNORE = -100  # a label the loss skips: the colour of an image whose colour was altered


def hue_rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of images in [0, 1] (n, 3, h, w) by `degrees` (n,), about the grey axis."""
    a = torch.deg2rad(degrees).view(-1, 1, 1)
    k = torch.full((3,), 3 ** -0.5)
    cross = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rot = torch.cos(a) * torch.eye(3) + torch.sin(a) * cross + (1 - torch.cos(a)) * torch.outer(k, k)  # Rodrigues
    mean = x.mean(dim=1, keepdim=True)
    return (torch.einsum("nij,njhw->nihw", rot, x - mean) + mean).clamp(0, 1)


def degrade(x: torch.Tensor, labels: dict, g: torch.Generator) -> torch.Tensor:
    """The images unlearned models draw, made on purpose: random colour changes (pale, low
    contrast, desaturated, hue-shifted, off-palette via a channel shuffle), blur and noise, on
    images in [-1, 1]. A colour change sets the colour label to IGNORE: the shape and texture
    heads must answer for the form alone; the colour head learns only from unaltered colours."""
    n = len(x)
    u = lambda: torch.rand(n, generator=g)  # noqa: E731
    v = (x + 1) / 2
    kind = torch.randint(0, 6, (n,), generator=g)  # 0: no colour change
    changed = (kind > 0) & (u() < 0.55)
    s = u().view(-1, 1, 1, 1)
    grey = v.mean(dim=1, keepdim=True)
    pale = v + (0.2 + 0.65 * s) * (1 - v)                                  # toward white
    low = v.mean(dim=(1, 2, 3), keepdim=True) + (0.2 + 0.7 * s) * (v - v.mean(dim=(1, 2, 3), keepdim=True))
    desat = grey + (0.6 * s) * (v - grey)                                   # 40-100% desaturated
    hue = hue_rotate(v, 30 + 300 * u())
    shuffle = v[:, torch.randperm(3, generator=g)]
    options = torch.stack([v, pale, low, desat, hue, shuffle])              # (6, n, 3, h, w)
    v = torch.where(changed.view(-1, 1, 1, 1), options[kind, torch.arange(n)], v)
    labels["colour"] = torch.where(changed, torch.full_like(labels["colour"], IGNORE), labels["colour"])
    # blur: a 3x3 box or a Gaussian of sigma 0.5-1.2, on 35% of images
    blur = u() < 0.35
    if blur.any():
        sigma = 0.5 + 0.7 * torch.rand(1, generator=g).item()
        r = torch.arange(-2, 3, dtype=torch.float32)
        k1 = torch.exp(-r ** 2 / (2 * sigma ** 2)) if torch.rand(1, generator=g) < 0.5 else (r.abs() <= 1).float()
        k2 = torch.outer(k1, k1) / k1.sum() ** 2
        blurred = F.conv2d(F.pad(v, (2, 2, 2, 2), mode="replicate"), k2.expand(3, 1, 5, 5), groups=3)
        v = torch.where(blur.view(-1, 1, 1, 1), blurred, v)
    # Gaussian noise of std 0-0.125 in [0, 1] units (0-0.25 in [-1, 1]), on 35% of images
    noisy = (u() < 0.35).float().view(-1, 1, 1, 1)
    v = v + noisy * 0.125 * u().view(-1, 1, 1, 1) * torch.randn(v.shape, generator=g)
    return (v.clamp(0, 1) * 2 - 1)


def degenerate(n: int, g: torch.Generator) -> torch.Tensor:
    """Images that show nothing a caption names, for every head: a blank canvas, a full-frame
    fill (flat or patterned), or noise; in [-1, 1]."""
    kind = torch.randint(0, 3, (n,), generator=g)
    bg = 0.85 + 0.1 * torch.rand(n, 1, 1, 1, generator=g)
    blank = bg + 0.02 * torch.randn(n, 3, 32, 32, generator=g)
    colour = torch.rand(n, 3, 1, 1, generator=g)
    pattern = (torch.rand(n, 1, 32, 32, generator=g) < torch.rand(n, 1, 1, 1, generator=g)).float()
    fill = torch.where(torch.rand(n, 1, 1, 1, generator=g) < 0.5, colour.expand(n, 3, 32, 32),
                       pattern * colour + (1 - pattern) * bg)
    noise = torch.rand(n, 3, 32, 32, generator=g)
    v = torch.where(kind.view(-1, 1, 1, 1) == 0, blank, torch.where(kind.view(-1, 1, 1, 1) == 1, fill, noise))
    return v.clamp(0, 1) * 2 - 1


def train_judge(vae, steps: int, device, seed: int, arch: str = "cnn", batch: int = 128, desc: str = "5/6 judge"):
    """One judge on fresh procedural images each step: a quarter through the VAE (the softness
    of generated images), about half with their colour changed, some blurred or noisy, and 1 in
    10 degenerate (labelled "other" by every head)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 5])
    g = torch.Generator().manual_seed(seed)
    classes = {h: world.vocabulary()["classes"][h] for h in HEADS}
    judge = Judge(classes, arch=arch).to(device).train()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = cosine_lr(opt, steps)
    other = {h: len(classes[h]) - 1 for h in HEADS}
    n_bad = batch // 10
    bar = tqdm(range(steps), desc=desc, mininterval=5)
    for step in bar:
        images, labels = judge_batch(rng, batch - n_bad)
        x = torch.from_numpy(images)
        labels = {h: torch.from_numpy(labels[h]) for h in HEADS}
        with torch.no_grad():
            k = len(x) // 4
            x[:k] = vae.decode(vae.encode(x[:k].to(device)).latent_dist.mode()).sample.clamp(-1, 1).cpu()
        x = degrade(x, labels, g)
        x = torch.cat([x, degenerate(n_bad, g)])
        labels = {h: torch.cat([labels[h], torch.full((n_bad,), other[h])]) for h in HEADS}
        logits = judge(x.to(device))
        loss = sum(F.cross_entropy(logits[h], labels[h].to(device), ignore_index=IGNORE) for h in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return judge.eval().requires_grad_(False)


def build_judges(folder: Path, vae, steps: int, device, seed: int) -> dict:
    """The judge (arch resnet) and the cross-checking judge2 (arch cnn, another seed) into folder.
    (The resnet is the judge: the cnn called a third of the base model's crosses rings,
    docs/toy_world.md.)"""
    timings = {}
    for name, arch, s in (("judge", "resnet", seed + 100), ("judge2", "cnn", seed)):
        t0 = time.time()
        train_judge(vae, steps, device, s, arch, desc=f"{name} ({arch})").save(folder / name)
        timings[name] = time.time() - t0
    return timings


# ------------------------------------------------------------------------------------------
# Quality figures
# ------------------------------------------------------------------------------------------

def generate(pipe, prompts, seed: int, batch: int = 256) -> torch.Tensor:
    """Images in [-1, 1] from the diffusers pipeline with the recommended settings."""
    out = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator(pipe.device).manual_seed(seed + i)
        imgs = pipe(prompts[i:i + batch], generator=g, output_type="pt", **RECOMMENDED).images
        out.append(imgs * 2 - 1)
    return torch.cat(out).cpu()


def quality(folder: Path, device, n_per_value: int = 32, n_uncond: int = 256, seed: int = 1000,
            grid_path: Path | None = None):
    """Every figure of the toy world's quality table (docs/toy_world.md)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPModel, CLIPTokenizer
    judge = load_judge(folder / "judge", device)
    figures = {}
    # judge on fresh procedural images, a seed never used in training
    images, labels = judge_batch(np.random.default_rng([seed, 99]), 2000)
    pred = judge.predict(torch.from_numpy(images))
    figures["judge_accuracy"] = {h: float((pred[h].numpy() == labels[h]).mean()) for h in HEADS}
    # base pipeline on prompts naming one attribute
    pipe = StableDiffusionPipeline.from_pretrained(folder / "pipeline", safety_checker=None).to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    jobs = []
    for s in world.SHAPES:
        jobs += [("shape", s, world.caption(s)), ("shape_synonym", s, world.caption(world.SHAPE_SYNONYMS[s]))]
    for c in world.COLOURS:
        jobs.append(("colour", c, world.caption(colour=c)))
    for t in world.TEXTURES:
        jobs += [("texture", t, world.caption(texture=t)),
                 ("texture_synonym", t, world.caption(texture=world.TEXTURE_SYNONYMS[t]))]
    prompts = [p for _, _, p in jobs for _ in range(n_per_value)]
    t0 = time.time()
    images = generate(pipe, prompts, seed)
    log(f"sampled {len(prompts)} images in {time.time() - t0:.1f}s")
    pred = judge.predict(images)
    if (folder / "judge2").exists():  # how often the cross-checking judge gives the same answer
        pred2 = load_judge(folder / "judge2", device).predict(images)
        heads = torch.tensor([HEADS.index(kind.split("_")[0]) for kind, _, _ in jobs]).repeat_interleave(n_per_value)
        same = torch.stack([pred[h] == pred2[h] for h in HEADS], 1)[torch.arange(len(heads)), heads]
        figures["judges_agree_base"] = float(same.float().mean())
    for j, (kind, value, prompt) in enumerate(jobs):
        head = kind.split("_")[0]
        p = pred[head][j * n_per_value:(j + 1) * n_per_value]
        acc = float((p == world.vocabulary()["classes"][head].index(value)).float().mean())
        figures.setdefault(f"base_{kind}", {})[value] = acc
    # a picture: one row per shape and per texture (and the empty prompt), 8 seeds each
    rows = [world.caption(s) for s in world.SHAPES] + [world.caption(texture=t) for t in world.TEXTURES] + [""]
    grid = generate(pipe, [p for p in rows for _ in range(8)], seed + 3).view(len(rows), 8, 3, 32, 32)
    common.image_grid(grid, grid_path or folder / "toy_world.png", ["'" + r + "'" for r in rows])
    # unconditional prior
    images = generate(pipe, [""] * n_uncond, seed + 7)
    pred = judge.predict(images)
    figures["uncond_share"] = {
        **{s: float((pred["shape"] == i).float().mean()) for i, s in enumerate(world.SHAPES)},
        **{t: float((pred["texture"] == i).float().mean()) for i, t in enumerate(world.TEXTURES)}}
    # sampling speed: 64 images, recommended settings
    t0 = time.time()
    generate(pipe, ["a red circle"] * 64, seed)
    figures["seconds_for_64_images"] = time.time() - t0
    # CLIP retrieval among every full caption of the vocabulary
    clip = CLIPModel.from_pretrained(folder / "clip").to(device).eval()
    tok = CLIPTokenizer.from_pretrained(folder / "clip")
    full = [(s, c, t) for t in world.TEXTURES for c in world.COLOURS for s in world.SHAPES]
    rng = np.random.default_rng([seed, 98])
    truth = rng.integers(len(full), size=500)
    imgs = np.stack([world.draw(*full[k], rng) for k in truth])
    with torch.no_grad():
        tf = clip.get_text_features(input_ids=tokenize(tok, [world.caption(*f) for f in full]).to(device))
        vf = clip.get_image_features(pixel_values=torch.from_numpy(imgs).to(device))
        tf = getattr(tf, "pooler_output", tf)
        vf = getattr(vf, "pooler_output", vf)
        top1 = (F.normalize(vf, dim=-1) @ F.normalize(tf, dim=-1).T).argmax(-1).cpu().numpy()
    figures["clip_top1"] = float((top1 == truth).mean())
    figures["n_images"] = {"per_value": n_per_value, "uncond": n_uncond, "judge": 2000, "clip": 500}
    return figures


def summarize(fig) -> str:
    rows = ["| figure | value |", "|---|---|"]
    for h in HEADS:
        rows.append(f"| judge accuracy, {h} (2000 fresh images) | {fig['judge_accuracy'][h]:.1%} |")
    for kind in ("shape", "shape_synonym", "colour", "texture", "texture_synonym"):
        v = fig[f"base_{kind}"]
        detail = ", ".join(f"{k} {a:.0%}" for k, a in v.items())
        rows.append(f"| base {kind.replace('_', ' ')} accuracy: mean (min) | "
                    f"{np.mean(list(v.values())):.1%} ({min(v.values()):.0%}): {detail} |")
    if "judges_agree_base" in fig:
        rows.append(f"| the two judges agree on base-model images (per-value prompts) | {fig['judges_agree_base']:.1%} |")
    u = fig["uncond_share"]
    rows.append(f"| unconditional samples showing a named value: max | {max(u.values()):.1%} "
                f"({', '.join(f'{k} {a:.1%}' for k, a in u.items())}) |")
    rows.append(f"| CLIP top-1 among {6 * 6 * 4} full captions | {fig['clip_top1']:.1%} |")
    rows.append(f"| seconds to sample 64 images ({RECOMMENDED['num_inference_steps']} DDIM steps) | "
                f"{fig['seconds_for_64_images']:.1f} |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------
# 7. The unconditional class model (VDU's own setting): python -m toy.build --only-uncond
# ------------------------------------------------------------------------------------------
# VDU's paper unlearns a class from an unconditional DDPM. This model draws the toy's named
# content with no prompt at all: every shape in equal shares, in every colour and texture. It
# works on the committed VAE's latents (8x8x4; 32x32 pixels would cost 16 times the compute), so
# the folder is an LDMPipeline (diffusers' unconditional latent pipeline: vqvae, unet, scheduler;
# the VAE sits in the `vqvae` slot, which diffusers loads with a type warning and decodes as
# it should). DDPMPipeline is the pixel-space equivalent.

UNCOND_STEPS = {"unet": 8000, "snapshot": 200}


def make_uncond_unet(channels=UNET_CHANNELS):
    """The conditional UNet's layout with self-attention where it has cross-attention."""
    from diffusers import UNet2DModel
    return UNet2DModel(
        **UNET_LAYOUT, block_out_channels=tuple(channels),
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"), attention_head_dim=8)


def uncond_quality(folder: Path, device, n: int = 1024, seed: int = 2000) -> dict:
    """Each shape's share among n samples of diffusers' own LDMPipeline, by the judge."""
    from diffusers import LDMPipeline
    judge = load_judge(HERE / "judge", device)
    pipe = LDMPipeline.from_pretrained(folder).to(device)
    pipe.set_progress_bar_config(disable=True)
    t0, images = time.time(), []
    for i in range(0, n, 256):
        gens = [torch.Generator().manual_seed(seed + k) for k in range(i, min(n, i + 256))]
        out = pipe(batch_size=len(gens), generator=gens, num_inference_steps=RECOMMENDED["num_inference_steps"],
                   output_type="np").images
        images.append(torch.from_numpy(out).permute(0, 3, 1, 2) * 2 - 1)
    seconds = time.time() - t0
    pred = judge.predict(torch.cat(images))
    classes = world.vocabulary()["classes"]
    return {"n_images": n, "seconds_to_sample": seconds,
            "shape_share": {s: float((pred["shape"] == i).float().mean()) for i, s in enumerate(classes["shape"])},
            "texture_share": {t: float((pred["texture"] == i).float().mean())
                              for i, t in enumerate(classes["texture"])}}


def build_uncond(out: Path, device, seed: int, scale: float, n_snapshots: int = 3) -> dict:
    """toy/uncond/: the LDMPipeline, snapshots/ (for VDU's checkpoint recipe) and uncond.json."""
    from diffusers import AutoencoderKL, DDIMScheduler, LDMPipeline
    steps = {k: max(2, int(v * scale)) for k, v in UNCOND_STEPS.items()}
    vae = AutoencoderKL.from_pretrained(out / "pipeline", subfolder="vae", torch_dtype=torch.float32)
    vae = vae.to(device).eval().requires_grad_(False)
    tmp = out / ".build-uncond-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    timings, t0 = {}, time.time()
    unet = train_unet(make_uncond_unet(), vae, None, steps["unet"], device, seed + 20, lr=3e-4,
                      desc="uncond UNet", ema_decay=0.999)
    timings["unet"] = time.time() - t0
    LDMPipeline(vqvae=half(vae), unet=half(unet), scheduler=DDIMScheduler(**SCHEDULER)).save_pretrained(
        tmp, safe_serialization=True)
    t0 = time.time()
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    for k in range(n_snapshots):
        snap = make_uncond_unet()
        snap.load_state_dict(base_state)
        snap = train_unet(snap, vae, None, steps["snapshot"], device, seed + 30 + k, lr=1e-4,
                          desc=f"uncond snapshot {k + 1}")
        half(snap).save_pretrained(tmp / "snapshots" / f"unet-{k + 1}")
    timings["snapshots"] = time.time() - t0
    t0 = time.time()
    figures = uncond_quality(tmp, device)
    timings["quality"] = time.time() - t0
    info = {"build": {"seed": seed, "device": str(device), "steps": steps, "seconds": timings,
                      "parameters": sum(p.numel() for p in unet.parameters()), "torch": torch.__version__,
                      "threads": torch.get_num_threads()},
            "quality": figures}
    (tmp / "uncond.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out / "uncond", ignore_errors=True)
    tmp.rename(out / "uncond")
    return info


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------

def half(module):
    """A float16 copy for saving (committed artifacts stay small; they load as float32)."""
    import copy
    return copy.deepcopy(module).to(torch.float16)


def load_as_float32(config_json: Path) -> None:
    """transformers loads a model in the dtype its config names: make that float32, so that a
    plain from_pretrained gives a float32 model from the float16 weights (diffusers does so too)."""
    config = json.loads(config_json.read_text())
    config["dtype"] = "float32"
    for sub in ("text_config", "vision_config"):
        if sub in config:
            config[sub]["dtype"] = "float32"
    config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(HERE), help="folder to write the toy world into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the whole build")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every stage's training steps (e.g. 0.02 for a smoke test)")
    parser.add_argument("--snapshots", type=int, default=3, help="number of extra UNet snapshots")
    parser.add_argument("--unet-channels", type=int, nargs=3, default=UNET_CHANNELS,
                        help="UNet block widths")
    parser.add_argument("--grid", default=str(HERE.parent / "docs" / "toy_world.png"),
                        help="where to save the picture of base-model samples")
    parser.add_argument("--only-quality", action="store_true", help="skip training, re-measure")
    parser.add_argument("--only-judges", action="store_true",
                        help="retrain only the two judges (judge/, judge2/) on the committed VAE, then re-measure")
    parser.add_argument("--only-uncond", action="store_true",
                        help="build only the unconditional class model (uncond/, VDU's setting) on the committed VAE")
    args = parser.parse_args()
    if args.only_uncond:
        info = build_uncond(Path(args.out), torch.device(args.device), args.seed, args.scale)
        print(json.dumps(info, indent=1))
        return
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel

    out = Path(args.out)
    device = torch.device(args.device)
    steps = {k: max(2, int(v * args.scale)) for k, v in STEPS.items()}
    timings = {}
    if args.only_judges:
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(out / "pipeline", subfolder="vae", torch_dtype=torch.float32)
        vae = vae.to(device).eval().requires_grad_(False)
        tmp = out / ".build-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        timings.update(build_judges(tmp, vae, steps["judge"], device, args.seed + 4))
        for name in ("judge", "judge2"):
            shutil.rmtree(out / name, ignore_errors=True)
            (tmp / name).rename(out / name)
        shutil.rmtree(tmp)
    elif not args.only_quality:
        tmp = out / ".build-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.time()
        tok = build_tokenizer(tmp / "pipeline" / "tokenizer")
        clip = train_clip(tok, steps["clip"], device, args.seed + 1)
        half(clip).save_pretrained(tmp / "clip")
        tok.save_pretrained(tmp / "clip")
        CLIPImageProcessor(do_resize=False, do_center_crop=False, size={"shortest_edge": 32},
                           crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                           image_std=[0.5] * 3).save_pretrained(tmp / "clip")
        text_encoder = CLIPTextModel(CLIPTextConfig(**clip.config.text_config.to_dict()))
        text_encoder.load_state_dict(clip.text_model.state_dict())
        text_encoder = text_encoder.to(device).eval().requires_grad_(False)
        timings["clip"] = time.time() - t0

        t0 = time.time()
        vae = train_vae(steps["vae"], device, args.seed + 2)
        timings["vae"] = time.time() - t0

        t0 = time.time()
        text = TextCache(tok, text_encoder, device)
        unet = train_unet(make_unet(args.unet_channels), vae, text, steps["unet"], device, args.seed + 3, lr=3e-4,
                          desc="4/6 UNet", ema_decay=0.999)
        n_params = sum(p.numel() for p in unet.parameters())
        log(f"UNet: {n_params / 1e6:.2f}M parameters")
        timings["unet"] = time.time() - t0

        pipe = StableDiffusionPipeline(vae=half(vae), text_encoder=half(text_encoder), tokenizer=tok,
                                       unet=half(unet), scheduler=DDIMScheduler(**SCHEDULER),
                                       safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.save_pretrained(tmp / "pipeline", safe_serialization=True)
        load_as_float32(tmp / "pipeline" / "text_encoder" / "config.json")
        load_as_float32(tmp / "clip" / "config.json")

        timings.update(build_judges(tmp, vae, steps["judge"], device, args.seed + 4))

        t0 = time.time()
        base_state = {k: v.clone() for k, v in unet.state_dict().items()}
        for k in range(args.snapshots):
            snap = make_unet(args.unet_channels)
            snap.load_state_dict(base_state)
            snap = train_unet(snap, vae, text, steps["snapshot"], device, args.seed + 10 + k,
                              lr=1e-4, desc=f"6/6 snapshot {k + 1}")
            half(snap).save_pretrained(tmp / "snapshots" / f"unet-{k + 1}")
        timings["snapshots"] = time.time() - t0

        for name in ("pipeline", "clip", "judge", "judge2", "snapshots"):
            shutil.rmtree(out / name, ignore_errors=True)
            (tmp / name).rename(out / name)
        shutil.rmtree(tmp)

    t0 = time.time()
    figures = quality(out, device, grid_path=Path(args.grid) if args.grid else None)
    timings["quality"] = time.time() - t0
    info = {
        "vocabulary": world.vocabulary(),
        "recommended": RECOMMENDED,
        "build": {"seed": args.seed, "device": str(device), "steps": steps, "seconds": timings,
                  "torch": torch.__version__, "threads": torch.get_num_threads()},
        "quality": figures,
    }
    if (args.only_quality or args.only_judges) and (out / "toy.json").exists():
        info["build"] = json.loads((out / "toy.json").read_text())["build"]
        if args.only_judges:  # the rest of the build is as it was; the judges are new
            info["build"]["seconds"].update({k: timings[k] for k in ("judge", "judge2")})
            info["build"]["seconds"].pop("judge_stage_note", None)
            info["build"]["steps"]["judge"] = steps["judge"]
    (out / "toy.json").write_text(json.dumps(info, indent=1))
    print(summarize(figures))
    print(f"timings (s): {json.dumps({k: round(v) for k, v in timings.items()})}")


if __name__ == "__main__":
    main()
