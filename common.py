"""Shared machinery for the unlearning methods, in reading order.

The lesson first: a Stable Diffusion checkpoint (hub id, local folder, or the offline toy world)
loaded through one code path; DDIM sampling (deterministic, or stochastic as the RL method's
policy); noising clean latents for denoising losses and choosing which UNet parameters train;
the forget and retain prompt sets of a concept, from one concept table. Then the plumbing every
method file needs: seed and device, resolving and checking a model name, arguments from a
dataclass, range checks, signals, and safe output folders.

The method-specific math lives in the method files, where a reader looks for it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import sys
import threading
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent
TOY_DIR = ROOT / "toy"
DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"


class UsageError(Exception):
    """A mistake in what the user asked for: printed as one sentence, never as a traceback."""


# ---------------------------------------------------------------------------------------------
# Models: a Stable Diffusion checkpoint (SD 1.x, 2.x or SDXL; hub id, local folder or the toy)
# through one code path
# ---------------------------------------------------------------------------------------------

def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision context for the forward passes (a no-op in full precision)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@dataclass
class Models:
    """Everything a method needs from a Stable Diffusion checkpoint."""
    name: str                 # as the user gave it ("toy", a hub id, a folder)
    path: str                 # what was loaded from (folder or hub id)
    tokenizer: typing.Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module     # float32 master weights: the one that trains
    scheduler: typing.Any     # DDIMScheduler built from the model's scheduler config
    device: torch.device
    dtype: torch.dtype        # autocast / frozen-module dtype
    toy: dict | None = None   # toy/toy.json (vocabulary, recommended sampling) when --model toy
    sample_steps: int = 50
    guidance_scale: float = 7.5
    sample_batch_size: int = 64  # prompts per sampling batch (load_models sets it)
    chain: list = field(default_factory=list)  # the saved runs this model continues (chaining), oldest first
    # SDXL only: the second tokenizer and text encoder (with its projection: the pooled embedding),
    # whether the empty prompt is all zeros (model_index.json's force_zeros_for_empty_prompt), and
    # the six size numbers of its added time ids
    tokenizer_2: typing.Any = None
    text_encoder_2: torch.nn.Module | None = None
    zero_empty_prompt: bool = False
    time_ids: tuple = ()
    _prompt_cache: dict = field(default_factory=dict, repr=False)

    @property
    def erased(self) -> list[str]:
        """The concepts earlier runs of the chain erased: never retain prompts again."""
        return [c for run in self.chain for c in concept_names(run["concept"])]

    @property
    def is_toy(self) -> bool:
        return self.toy is not None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def conditional(self) -> bool:
        """False for an unconditional model (toy-uncond, VDU's class setting): no text at all."""
        return self.text_encoder is not None


def load_models(model: str, device: torch.device, dtype: torch.dtype = torch.float32,
                sample_batch_size: int | None = None, unconditional_ok: bool = False) -> Models:
    """Tokenizer and CLIP text encoder (SDXL: two of each), VAE, UNet and a DDIM scheduler,
    safetensors only.
    `sample_batch_size`: prompts per sampling batch (default: 64 on the toy, 8 on SD, where a batch of
    64 prompts alone needs about 24 GiB); every image the methods and eval generate goes through it.
    An unconditional model (toy-uncond) loads only where the caller handles one (`unconditional_ok`).

    Frozen parts (text encoder, VAE) are in eval mode without gradients, in `dtype`; the UNet
    stays float32 (it is what trains; autocast handles mixed precision).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    run = saved_run(model)
    if run is not None:  # chaining: the base model the run names, with the run's UNet in its place
        try:
            models = load_models(run["base_model"], device, dtype, sample_batch_size, unconditional_ok)
        except UsageError as e:
            raise UsageError(f"{model} is a saved run of {run['base_model']!r}, its base model, which could not "
                             f"be loaded ({e})") from None
        models.unet = load_run_unet(model, device)
        models.chain = run.get("chain", []) + [{"run": str(model), "method": run.get("method"),
                                                "concept": run["args"]["concept"]}]
        return models
    path, toy = resolve_model(model)
    kw = dict(use_safetensors=True)
    cls = pipeline_class(path)
    refuse_pipeline(cls, model)
    sdxl = cls == SDXL_PIPELINE
    if is_unconditional(path):
        if not unconditional_ok:
            raise UsageError(f"{model} is an unconditional model (no text encoder): this needs a text-to-image "
                             "model such as --model toy (vdu.py and eval.py take an unconditional one).")
        return load_unconditional(model, path, toy, device, dtype, sample_batch_size)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **kw)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch.float32, **kw)
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
        if sdxl:
            tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2")
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2",
                                                                         dtype=dtype, **kw)
    except (OSError, ValueError) as e:
        if Path(path).exists():
            raise UsageError(f"could not load the model in {path}: {str(e).splitlines()[0]}") from None
        raise UsageError(f"could not load model {model!r}: it is not a local folder and the Hugging Face "
                         "hub could not provide it (offline or not in the cache); to run offline, use "
                         "--model toy.") from None
    check_scheduler(scheduler, model)
    for m in (text_encoder, vae):
        m.to(device).eval().requires_grad_(False)
    if not toy:
        vae.enable_slicing()  # decode 512x512 images one at a time: batches would not fit in memory
    unet.to(device)
    models = Models(model, path, tokenizer, text_encoder, vae, unet, scheduler, device, dtype, toy)
    models.sample_batch_size = sample_batch_size or (64 if toy else 8)
    if sdxl:
        models.tokenizer_2, models.text_encoder_2 = tokenizer_2, text_encoder_2.to(device).eval().requires_grad_(False)
        with_sdxl_inputs(unet, model, pooled=text_encoder_2.config.projection_dim)
        models.zero_empty_prompt = model_index(path).get("force_zeros_for_empty_prompt", True)
        models.guidance_scale = 5.0  # diffusers' SDXL pipeline's default (SD's: 7.5)
        size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)  # pixels
        models.time_ids = (size, size, 0, 0, size, size)  # original size, crop top-left, target size
        if dtype == torch.float16 and vae.config.force_upcast:
            vae.to(torch.float32)  # SDXL's VAE overflows in float16, as diffusers' pipeline knows
    if toy:
        models.sample_steps = toy["recommended"]["num_inference_steps"]
        models.guidance_scale = toy["recommended"]["guidance_scale"]
    return models


def unet_output(unet, x_t: torch.Tensor, t, cond: torch.Tensor | None) -> torch.Tensor:
    """The UNet's prediction for x_t at t given the text states `cond`, or given nothing for an
    unconditional UNet (cond None): the one call where the two kinds of model differ."""
    if cond is None:
        return unet(x_t, t).sample
    return unet(x_t, t, encoder_hidden_states=cond).sample


def frozen_copy(unet: torch.nn.Module) -> torch.nn.Module:
    """The reference: a frozen float32 copy of the UNet before training (eps_ref in the methods'
    notation), in eval mode, with no gradients."""
    import copy
    return copy.deepcopy(unet).eval().requires_grad_(False)


def reference(unet: torch.nn.Module, train: str) -> torch.nn.Module:
    """eps_ref, the model a method measures its UNet against: a frozen copy of the UNet before
    training, or for --train lora the same UNet with its adapters switched off (no second copy:
    the adapters are all that trains, and without them the UNet is the starting model)."""
    return AdaptersOff(unet) if train == "lora" else frozen_copy(unet)


class AdaptersOff(torch.nn.Module):
    """A LoRA-trained UNet seen without its adapters: called like the UNet, it switches them off
    for the call. Attributes (config, dtype, ...) are the UNet's; it owns no parameters."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.__dict__["unet"] = unet  # not a submodule: its weights are not a second model's

    def forward(self, *args, **kwargs):
        self.unet.disable_adapters()
        try:
            return self.unet(*args, **kwargs)
        finally:
            self.unet.enable_adapters()

    def __getattr__(self, name):
        return getattr(self.__dict__["unet"], name)


@torch.no_grad()
def encode_prompts(models: Models, prompts: list[str]) -> torch.Tensor:
    """CLIP text hidden states (n, tokens, dim) as SD conditions on them (SDXL: one more token,
    sdxl_text_states); cached per prompt."""
    cache = models._prompt_cache
    new = [p for p in dict.fromkeys(prompts) if p not in cache]
    if new:
        if models.is_toy:
            for p in new:
                check_toy_prompt(p, models.toy)
        for i in range(0, len(new), 64):
            chunk = new[i:i + 64]
            cache.update(zip(chunk, (sdxl_text_states if models.is_sdxl else text_states)(models, chunk)))
    return torch.stack([cache[p] for p in prompts])


def text_states(models: Models, prompts: list[str]) -> torch.Tensor:
    """(n, 77, dim): the CLIP text encoder's last hidden states, padded to its length (SD 1.x, 2.x)."""
    tok = models.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(models.device)
    return models.text_encoder(ids)[0]


# SDXL conditions its UNet on more than token states: two text encoders, whose penultimate hidden
# states are joined token by token (77 tokens of 768 + 1280 = 2048 numbers), and two more inputs,
# the second encoder's pooled embedding of the prompt (1280 numbers) and six "added time ids" (the
# image's original height and width, its crop's top and left, the target height and width). So
# that every method keeps calling `unet(x_t, t, encoder_hidden_states=c)` with one tensor c, an
# SDXL prompt's c carries the two extra inputs in one more token after its 77: [pooled, time ids,
# zeros]. A hook on the UNet hands them to diffusers as `added_cond_kwargs` before each call
# (with_sdxl_inputs, with the plumbing below).
N_TIME_IDS = 6


def sdxl_text_states(models: Models, prompts: list[str]) -> torch.Tensor:
    """(n, 78, 2048) float32: the 77 token states of each prompt as diffusers' SDXL pipeline
    computes them, then the extra token [pooled embedding, time ids, zeros]."""
    def encode(tok, encoder):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(models.device)
        return encoder(ids, output_hidden_states=True)
    first, second = encode(models.tokenizer, models.text_encoder), encode(models.tokenizer_2, models.text_encoder_2)
    # the penultimate layer of each, as SDXL was trained, joined token by token
    states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1).float()
    pooled = second.text_embeds.float()  # the second encoder's projected pooled embedding
    if models.zero_empty_prompt:  # SDXL's unconditional input: zeros, not the encoded empty string
        empty = torch.tensor([p == "" for p in prompts], device=states.device)
        states[empty], pooled[empty] = 0.0, 0.0
    time_ids = torch.tensor(models.time_ids, dtype=torch.float32, device=states.device).expand(len(prompts), -1)
    extra = torch.zeros(len(prompts), 1, states.shape[-1], device=states.device)
    extra[:, 0, :pooled.shape[-1] + N_TIME_IDS] = torch.cat([pooled, time_ids], dim=-1)
    return torch.cat([states, extra], dim=1)


# ---------------------------------------------------------------------------------------------
# DDIM: one step (with its Gaussian log-probability) and the sampler
# ---------------------------------------------------------------------------------------------

def _abar_t(scheduler, t, x_t: torch.Tensor):
    """abar_t: a CPU scalar for an int t, or an (n, 1, 1, 1) tensor on x_t's device for one t per sample."""
    if torch.is_tensor(t) and t.ndim == 1:
        return scheduler.alphas_cumprod.to(x_t.device)[t.to(x_t.device)].view(-1, *([1] * (x_t.ndim - 1)))
    return scheduler.alphas_cumprod[int(t)]


def previous_timesteps(timesteps) -> torch.Tensor:
    """The timestep each DDIM step of `timesteps` (noisiest first) goes to: the next one in the
    list, and -1 (the end: the scheduler's final abar) after the last."""
    timesteps = torch.as_tensor(timesteps)
    return torch.cat([timesteps[1:], timesteps.new_tensor([-1])])


def _abar(scheduler, t, t_prev, x_t: torch.Tensor, eta: float):
    """(abar_t, abar_prev) of the DDIM step t -> t_prev: CPU scalars for an int t (no device round
    trip, as in diffusers), or (n, 1, 1, 1) tensors on x_t's device for one timestep per sample.

    t_prev < 0 is the end of sampling: diffusers' final_alpha_cumprod, which is 1 for a scheduler
    with set_alpha_to_one=True. With eta > 0 that would make sigma_t 0 and the step's
    log-probability undefined, so a stochastic step ends at abar_0 instead, as DDPO's sampler does
    (it clamps the previous timestep at 0). The two agree for SD v1.x, v2.x and the toy, whose
    final_alpha_cumprod is abar_0."""
    abar = scheduler.alphas_cumprod
    final = abar[0] if eta > 0 else scheduler.final_alpha_cumprod
    if torch.is_tensor(t) and t.ndim == 1:
        abar, t = abar.to(x_t.device), t.to(x_t.device)
        t_prev = torch.as_tensor(t_prev).to(x_t.device).expand_as(t)
        prev = torch.where(t_prev >= 0, abar[t_prev.clamp(min=0)], final.to(x_t.device))
        shape = (-1, *([1] * (x_t.ndim - 1)))
        return abar[t].view(shape), prev.view(shape)
    t, t_prev = int(t), int(t_prev)
    return abar[t], abar[t_prev] if t_prev >= 0 else final


def split_prediction(scheduler, output: torch.Tensor, t, x_t: torch.Tensor):
    """The UNet's output at (x_t, t) as (eps_hat, x0_hat); t an int or one per sample.

    epsilon models: eps_hat = output, x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t).
    v-prediction models (v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, with x_t = sqrt(abar_t) x_0 +
    sqrt(1 - abar_t) eps): x0_hat = sqrt(abar_t) x_t - sqrt(1 - abar_t) v, eps_hat = sqrt(1 - abar_t) x_t + sqrt(abar_t) v.
    """
    abar_t = _abar_t(scheduler, t, x_t)
    if scheduler.config.prediction_type == "v_prediction":
        return (1 - abar_t).sqrt() * x_t + abar_t.sqrt() * output, abar_t.sqrt() * x_t - (1 - abar_t).sqrt() * output
    return output, (x_t - (1 - abar_t).sqrt() * output) / abar_t.sqrt()


def predicted_x0(scheduler, output: torch.Tensor, t, x_t: torch.Tensor) -> torch.Tensor:
    """x0_hat from the UNet's output (eps or v, see split_prediction); t an int or one per sample."""
    return split_prediction(scheduler, output, t, x_t)[1]


def ddim_step(scheduler, output: torch.Tensor, t, t_prev, x_t: torch.Tensor, eta: float = 0.0,
              generators: list[torch.Generator] | None = None, prev_sample: torch.Tensor | None = None):
    """One DDIM step x_t -> x_{t-1} as a Gaussian policy (Song et al. 2021, eq. 12 and 16), from
    the UNet's (guided) output: eps, or v for a v-prediction model (see split_prediction).

    Returns (x_prev, log_prob (n,), mean, sigma). With eta = 0 it equals diffusers'
    DDIMScheduler.step. With eta > 0, x_prev ~ N(mean, sigma^2 I) is drawn with `generators`
    (one per image), or `prev_sample` is scored instead (the RL method re-evaluates stored
    actions under new parameters). log_prob is the mean over latent elements (DDPO convention).
    `t` is an int, or a tensor with one timestep per sample; `t_prev` is where the step goes (see
    previous_timesteps), given rather than read from the scheduler, whose step count belongs to
    whoever last called its set_timesteps.
    """
    abar_t, abar_prev = _abar(scheduler, t, t_prev, x_t, eta)
    eps, x0_hat = split_prediction(scheduler, output, t, x_t)
    # sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
    # mu = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps
    mean = abar_prev.sqrt() * x0_hat + (1 - abar_prev - sigma ** 2).sqrt() * eps
    if eta == 0:
        return mean, torch.zeros(len(x_t), device=x_t.device), mean, sigma
    if prev_sample is None:
        noise = torch.cat([torch.randn((1, *x_t.shape[1:]), generator=g) for g in generators])
        prev_sample = mean + sigma * noise.to(x_t.device, x_t.dtype)
    # log N(x_prev; mu, sigma^2 I), averaged over the latent's elements
    log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * sigma ** 2) - sigma.log()
                - math.log(math.sqrt(2 * math.pi)))
    return prev_sample, log_prob.mean(dim=tuple(range(1, x_t.ndim))), mean, sigma


def guided_eps(unet, x_t: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor, w: float,
               with_uncond: bool = False):
    """Classifier-free guidance: eps_hat = eps_u + w (eps_c - eps_u), one batched UNet call.
    At w = 1 that is eps_c alone, so the unconditional half is not computed, unless
    `with_uncond` asks for it: then (eps_hat, eps_u) is returned. cond None: an unconditional
    model, which has no guidance (its own prediction)."""
    if cond is None or (w == 1 and not with_uncond):
        return unet_output(unet, x_t, t, cond)
    t = torch.cat([t, t]) if torch.is_tensor(t) and t.ndim == 1 else t
    eps_u, eps_c = unet(torch.cat([x_t, x_t]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
    eps_hat = eps_u + w * (eps_c - eps_u)
    return (eps_hat, eps_u) if with_uncond else eps_hat


@dataclass
class Samples:
    images: torch.Tensor    # (n, 3, H, W) in [-1, 1], float32, CPU
    latents: torch.Tensor   # (n, 4, h, w) final x_0 in the UNet's (VAE-scaled) latent space


@torch.no_grad()
def sample(models: Models, prompts: list[str], seeds: list[int], unet=None, steps: int | None = None,
           guidance_scale: float | None = None, eta: float = 0.0, batch_size: int | None = None,
           decode: bool = True, progress: bool = False, text_states: torch.Tensor | None = None,
           on_step=None) -> Samples:
    """DDIM sampling with classifier-free guidance, one seed per image (an unconditional model
    ignores the prompts and the guidance: pass [""] * n).

    `text_states` (n, tokens, dim), if given, are the prompts' text states, used instead of encoding
    `prompts` (attack.py samples from a learned embedding no word of the vocabulary spells).

    With eta = 0 the images equal diffusers' StableDiffusionPipeline with a DDIMScheduler and
    `generator=[torch.Generator().manual_seed(s) for s in seeds]` (tested). With eta > 0 every
    step draws x_{t-1} ~ N(mu, sigma_t^2 I). `on_step(t, x_t, x_prev, output, log_prob)`, if given,
    sees every step of every batch (rl_critic.py records them as trajectories).
    """
    unet = unet or models.unet
    steps = steps or models.sample_steps
    batch_size = batch_size or models.sample_batch_size
    w = models.guidance_scale if guidance_scale is None else guidance_scale
    sched = models.scheduler
    sched.set_timesteps(steps)
    timesteps = sched.timesteps.tolist()  # python ints: no device round trip per step
    prev_timesteps = previous_timesteps(timesteps).tolist()
    latent_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    images, latents = [], []
    chunks = range(0, len(prompts), batch_size)
    for i in tqdm(chunks, desc="sampling", disable=not progress or len(chunks) < 2, leave=False):
        p, s = prompts[i:i + batch_size], seeds[i:i + batch_size]
        gens = [torch.Generator().manual_seed(int(x)) for x in s]
        cond = uncond = None  # an unconditional model: no prompt, no guidance
        if models.conditional:
            cond = encode_prompts(models, p) if text_states is None else text_states[i:i + batch_size].to(models.device)
            uncond = encode_prompts(models, [""] * len(p))
        x = torch.cat([torch.randn((1, *latent_shape), generator=g) for g in gens]).to(models.device)
        x = x * sched.init_noise_sigma
        for t, t_prev in zip(timesteps, prev_timesteps):
            with autocast(models.device, models.dtype):
                pred = guided_eps(unet, x, t, cond, uncond, w).float()  # eps, or v (v-prediction)
            x_prev, log_prob, _, _ = ddim_step(sched, pred, t, t_prev, x, eta, gens)
            if on_step:
                on_step(t, x, x_prev, pred, log_prob)
            x = x_prev
        latents.append(x.cpu())
        if decode:
            images.append(decode_latents(models, x).cpu())
    return Samples(torch.cat(images) if images else None, torch.cat(latents))


def decode_latents(models: Models, latents: torch.Tensor) -> torch.Tensor:
    """SD latents -> images in [-1, 1] (float32)."""
    vae = models.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return images.float().clamp(-1, 1)


@torch.no_grad()
def encode_images(models: Models, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> SD latents (scaled by the VAE factor), e.g. for a folder of real images."""
    vae = models.vae
    latents = vae.encode(images.to(models.device, vae.dtype)).latent_dist.sample()
    return latents.float() * vae.config.scaling_factor


# ---------------------------------------------------------------------------------------------
# Training: noising, which parameters train, fp16 loss scaling, a finite loss
# ---------------------------------------------------------------------------------------------

def add_noise(scheduler, x0: torch.Tensor, generator: torch.Generator | None = None,
              t: torch.Tensor | None = None, t_min: int = 0):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with t ~ U[t_min, 1000): returns (x_t, t, target),
    the target being what the UNet is trained to output there: eps, or for a v-prediction model
    v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0. (The methods call it eps: on SD v1.x and the toy it is.)"""
    n = len(x0)
    if t is None:
        t = torch.randint(t_min, scheduler.config.num_train_timesteps, (n,), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    abar = scheduler.alphas_cumprod.to(x0.device)[t].view(n, *([1] * (x0.ndim - 1)))
    target = eps
    if scheduler.config.prediction_type == "v_prediction":
        target = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps, t, target


def select_trainable(unet: torch.nn.Module, which: str, verbose: bool = True, lora_rank: int = 4,
                     lora_on: str = "full") -> list[torch.nn.Parameter]:
    """Choose the UNet parameters that train, by SD module name.

    xattn: cross-attention only (`attn2`: to_q, to_k, to_v, to_out); noxattn: everything else;
    full: all; lora: new low-rank adapters (add_lora) on the attention layers of `lora_on`.
    Everything not chosen is frozen.
    """
    rules = {"xattn": lambda n: ".attn2." in n, "noxattn": lambda n: ".attn2." not in n,
             "full": lambda n: True}
    if which == "lora":
        params = add_lora(unet, lora_rank, lora_on)
    elif which not in rules:
        raise UsageError(f"unknown --train {which!r}: use one of {', '.join(rules)}, lora.")
    else:
        params = []
        for name, p in unet.named_parameters():
            p.requires_grad_(rules[which](name))
            if p.requires_grad:
                params.append(p)
    if not params:
        raise UsageError(f"--train {which} selects no parameter of this UNet (it has no "
                         f"{'cross-attention' if 'xattn' in (which, lora_on) else 'such'} layers).")
    if verbose:
        total = sum(p.numel() for p in unet.parameters())
        n = sum(p.numel() for p in params)
        print(f"training {n:,} of {total:,} UNet parameters ({which}, {100 * n / total:.1f}%)")
    return params


# LoRA (--train lora): W x becomes W x + B A x on each wrapped projection, A (r x in) random and
# B (out x r) zero at the start, so training starts exactly at the starting model; only A and B
# train. The adapters wrap the attention projections (to_q, to_k, to_v, to_out) of the layers a
# method trains: cross-attention (attn2), self-attention (attn1), or both. alpha = r (scale 1),
# the scale diffusers assumes when it loads saved adapters.
LORA_LAYERS = {"xattn": "attn2", "noxattn": "attn1", "full": "attn[12]"}


def add_lora(unet: torch.nn.Module, rank: int, on: str) -> list[torch.nn.Parameter]:
    """Add LoRA adapters of rank `rank` (peft) to the attention layers `on` (a key of LORA_LAYERS),
    freeze every other weight, and return the adapters' parameters."""
    from peft import LoraConfig
    if on not in LORA_LAYERS:
        raise UsageError(f"unknown --lora-on {on!r}: use one of {', '.join(LORA_LAYERS)}.")
    unet.requires_grad_(False)
    targets = rf".*\.{LORA_LAYERS[on]}\.(to_q|to_k|to_v|to_out\.0)"
    try:
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    except ValueError:  # peft: no module matched
        return []
    return [p for p in unet.parameters() if p.requires_grad]


def has_lora(unet: torch.nn.Module) -> bool:
    return bool(getattr(unet, "peft_config", None))


def loss_scaler(mixed_precision: str, device: torch.device):
    """fp16 loss scaling (torch.amp.GradScaler). Under fp16 autocast small gradients underflow to
    zero unless the loss is scaled up before backward and the gradients scaled back down before the
    step; a step whose gradients overflowed is skipped and the scale lowered. bf16 has fp32's range,
    and fp32 needs nothing: there the scaler is switched off and every call passes through. Use:

        scaler.scale(loss).backward()
        scaler.unscale_(opt)     # the true gradients from here: clip or mask them now
        scaler.step(opt)
        scaler.update()
    """
    return LossScaler(device.type, enabled=mixed_precision == "fp16")


class LossScaler(torch.amp.GradScaler):
    """GradScaler that counts the steps it skipped. A skipped step still counts toward --steps,
    so save_run records the count (`fp16_skipped_steps`) and says so when it is not 0. One run
    per process: the count is the class's."""
    skipped = 0

    def update(self, new_scale=None):
        before = self.get_scale() if self.is_enabled() else None
        super().update(new_scale)
        if before is not None and self.get_scale() < before:  # lowered: the step overflowed
            LossScaler.skipped += 1


def clipped_step(opt, scaler, params, max_norm: float) -> None:
    """One optimiser step on the accumulated gradients, their norm clipped to `max_norm` first
    (after the fp16 loss scaling is undone: a no-op otherwise)."""
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    scaler.step(opt)
    scaler.update()


def check_finite(step: int, **losses: torch.Tensor) -> None:
    """Stop the run (saving nothing) as soon as a loss is NaN or infinite."""
    for name, value in losses.items():
        if not torch.isfinite(value).all():
            raise UsageError(f"the loss {name} became {value.item()} at step {step}; the run was stopped "
                             "and nothing was saved (try a lower --lr).")


# ---------------------------------------------------------------------------------------------
# Concepts: what to forget and what to keep
# ---------------------------------------------------------------------------------------------

@dataclass
class PromptSet:
    """What to forget and what to keep, with the label each evaluation prompt should show."""
    concept: str
    kind: str                                  # toy: shape/colour/texture; SD: object/style/nudity
    forget: list[str]
    retain: list[str]                          # training-time retain prompts (in + cross)
    retain_in: list[tuple[str, str]]           # (prompt, value it shows), same kind as the concept
    retain_cross: list[tuple[str, str, str]]   # (prompt, kind, value), the other kinds
    synonym: list[str]                         # the concept named by a synonym / paraphrase only
    parts: list = field(default_factory=list)  # several concepts in one run: each one's own set


@dataclass(frozen=True)
class Concept:
    """A row of the Stable Diffusion concept table."""
    kind: str                        # object or style: which templates, which judge
    synonym: str | None = None       # names it without its name: the synonym-UA prompts
    imagenet_class: int | None = None  # objects: the ImageNet class the ResNet-50 judge must answer


# The Stable Diffusion concepts: the 10 Imagenette classes and 10 artists. Adding one is one line.
# (The toy's concepts, kinds and synonyms are its vocabulary, toy/toy.json.)
SD_CONCEPTS = {
    "tench": Concept("object", "doctor fish", 0),
    "English springer": Concept("object", "springer spaniel", 217),
    "cassette player": Concept("object", "tape deck", 482),
    "chain saw": Concept("object", "power saw", 491),
    "church": Concept("object", "chapel", 497),
    "French horn": Concept("object", "brass horn", 566),
    "garbage truck": Concept("object", "dump lorry", 569),
    "gas pump": Concept("object", "petrol pump", 571),
    "golf ball": Concept("object", "dimpled ball", 574),
    "parachute": Concept("object", "paraglider canopy", 701),
    "Van Gogh": Concept("style", "Vincent"),
    "Pablo Picasso": Concept("style", "the Spanish cubist"),
    "Claude Monet": Concept("style", "Oscar-Claude"),
    "Salvador Dali": Concept("style"),
    "Rembrandt": Concept("style"),
    "Andy Warhol": Concept("style"),
    "Frida Kahlo": Concept("style"),
    "Hokusai": Concept("style"),
    "Caravaggio": Concept("style"),
    "Edvard Munch": Concept("style"),
}
TEMPLATES = {"object": ["a photo of a {}", "an image of a {}", "a picture of a {}", "a close-up photo of a {}"],
             "style": ["a painting in the style of {}", "an artwork by {}", "a landscape painted by {}",
                       "a portrait in the style of {}"]}
IMAGENETTE = [name for name, c in SD_CONCEPTS.items() if c.kind == "object"]
ARTISTS = [name for name, c in SD_CONCEPTS.items() if c.kind == "style"]

# The seeds of the images a method draws for its training sets: image i of a set, in a run with
# --seed s, has seed s * SEED_STRIDE + SEED_OFFSET[set] + i, so no two sets or run seeds share an
# image. (The evaluation's seeds lie above them all, in eval.py.)
SEED_STRIDE = 10_000
SEED_OFFSET = {"forget": 0, "retain": 5_000, "fisher": 7_000, "held_out": 9_000}


def image_seeds(seed: int, which: str, n: int) -> list[int]:
    """The n image seeds of the training set `which` (a key of SEED_OFFSET) at run seed `seed`."""
    return [seed * SEED_STRIDE + SEED_OFFSET[which] + i for i in range(n)]


def concept_prompts(concept: str, models: Models, forget: list[str] | None = None,
                    retain: list[str] | None = None) -> PromptSet:
    """Turn `--concept` into forget / retain prompt sets (user lists override the defaults). A model
    that continues earlier runs (chaining) keeps none of their erased concepts among its retain
    prompts: what was erased before is not to be kept now."""
    ps = prompt_set(concept, models.toy)
    for part in ps.parts or [ps]:
        for earlier in models.erased:
            if names_the_same(prompt_set(earlier, models.toy), part.concept):
                raise UsageError(f"{part.concept!r} names {earlier!r}, which this model already erased (an earlier "
                                 "run of its chain): erase another concept.")
    if models.erased:
        for part in [ps] + ps.parts:
            drop_named(part, models.erased)
        if not ps.retain or not ps.retain_in:
            raise UsageError(f"every retain prompt of {concept!r} names a concept erased earlier "
                             f"({', '.join(models.erased)}): nothing of its kind is left to keep.")
    if forget:
        ps.forget = list(forget)
    if retain:
        ps.retain = list(retain)
    if models.is_toy:
        for p in ps.forget + ps.retain:
            check_toy_prompt(p, models.toy)
    if models.is_toy and not models.conditional and ps.kind != "shape":
        raise UsageError(f"{models.name}'s classes are the toy's shapes ({', '.join(models.toy['vocabulary']['shape'])}); "
                         f"{concept!r} is a {ps.kind}.")
    return ps


# Several concepts in one run (a repeated --concept) travel as one string, "circle + striped".
CONCEPT_JOIN = " + "


def concept_names(concept: str) -> list[str]:
    """The concepts of --concept: one, or several joined by CONCEPT_JOIN."""
    return [c.strip() for c in concept.split(CONCEPT_JOIN)]


def prompt_set(concept: str, toy: dict | None) -> PromptSet:
    """The default prompt sets of `concept`: the toy's (from its vocabulary `toy`) or SD's. Several
    concepts: their forget sets together, retain prompts naming none of them, each one's set in
    `parts` (for a loss or an evaluation that treats each concept on its own)."""
    names = concept_names(concept)
    if len(names) > 1:
        parts = [prompt_set(c, toy) for c in names]
        for i, part in enumerate(parts):
            same = [p.concept for p in parts[:i] if names_the_same(p, part.concept)]
            if same:
                raise UsageError(f"--concept {part.concept!r} names {same[0]!r} again (the same concept or its "
                                 "synonym): give each concept once.")
        for part in parts:
            drop_named(part, [p.concept for p in parts])
        kinds = {p.kind for p in parts}
        merged = PromptSet(CONCEPT_JOIN.join(p.concept for p in parts), kinds.pop() if len(kinds) == 1 else "mixed",
                           *[list(dict.fromkeys(x for p in parts for x in getattr(p, f)))
                             for f in ("forget", "retain", "retain_in", "retain_cross", "synonym")])
        merged.parts = parts
        return merged
    concept = concept.strip()
    if not concept:
        raise UsageError("--concept is empty: name what to forget, e.g. --concept circle (toy) "
                         "or --concept 'Van Gogh' (Stable Diffusion).")
    return toy_prompt_set(concept, toy) if toy else sd_prompt_set(concept)


def one_concept(ps: PromptSet, method: str, why: str) -> None:
    """Refuse several concepts in one run for a method whose loss has a per-concept term not yet
    generalised; they can still be erased one after another (chaining)."""
    if ps.parts:
        raise UsageError(f"{method} takes one --concept per run for now ({why}); erase the others one after "
                         "another with --model <run folder> --concept <the next>.")


def names_the_same(ps: PromptSet, concept: str) -> bool:
    """Whether `concept` is ps's concept or the synonym its synonym prompts name (as words)."""
    if concept.strip().lower() == ps.concept.lower():
        return True
    word = re.compile(rf"\b{re.escape(concept.strip())}\b", re.IGNORECASE)
    return any(word.search(p) for p in ps.synonym) and not any(word.search(p) for p in ps.forget)


def drop_named(ps: PromptSet, concepts: list[str]) -> None:
    """Leave out of `ps`'s retain prompts every prompt that names one of `concepts` (as a word)."""
    named = [re.compile(rf"\b{re.escape(c)}\b", re.IGNORECASE) for c in concepts]
    keeps = lambda prompt: not any(e.search(prompt) for e in named)  # noqa: E731
    ps.retain = [p for p in ps.retain if keeps(p)]
    ps.retain_in = [r for r in ps.retain_in if keeps(r[0])]
    ps.retain_cross = [r for r in ps.retain_cross if keeps(r[0])]


def concept_kind(concept: str, model: str) -> str:
    """The kind of `concept` on `model` (toy: shape/colour/texture; SD: object/style/nudity),
    known before any weights load (a method's defaults can depend on it)."""
    return prompt_set(concept, resolve_model(base_model_name(model))[1]).kind


def toy_caption(shape: str | None = None, colour: str | None = None, texture: str | None = None) -> str:
    """The toy's caption grammar: 'a striped red circle'; omitted attributes are left out, a
    missing shape reads 'shape' ('a striped shape'). The toy world's captions use it too."""
    words = [w for w in (texture, colour) if w] + [shape or "shape"]
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def toy_prompt_set(concept: str, toy: dict) -> PromptSet:
    v = toy["vocabulary"]
    kinds = {value: kind for kind in ("shape", "colour", "texture") for value in v[kind]}
    c = concept.lower()
    if c not in kinds:
        hint = ""
        for word, syn in v["synonyms"].items():
            if syn == c:
                hint = f" ({c!r} is a synonym of {word!r}: use --concept {word})"
        raise UsageError(f"{concept!r} is not a toy concept{hint}; the toy concepts are "
                         f"{toy_concepts_sentence(toy)}.")
    kind = kinds[c]

    def compositions(kind_, value):
        """The value alone and with each value of one other attribute."""
        others = [k for k in ("shape", "colour", "texture") if k != kind_]
        out = [toy_caption(**{kind_: value})]
        for o in others:
            out += [toy_caption(**{kind_: value, o: w}) for w in v[o]]
        return out

    forget = compositions(kind, c)
    retain_in = [(toy_caption(**{kind: w}), w) for w in v[kind] if w != c]
    retain_cross = [(toy_caption(**{k: w}), k, w) for k in ("shape", "colour", "texture") if k != kind for w in v[k]]
    # in-domain compositions, plus the other kinds named alone ("a red shape", "a striped shape")
    retain = [p for w in v[kind] if w != c for p in compositions(kind, w)] + [p for p, _, _ in retain_cross]
    syn = v["synonyms"].get(c)
    synonym = compositions(kind, syn) if syn else []
    return PromptSet(c, kind, forget, retain, retain_in, retain_cross, synonym)


def sd_prompt_set(concept: str) -> PromptSet:
    low = concept.lower()
    if low in ("nudity", "nude", "nsfw"):
        forget = ["a photo of a nude person", "a naked woman on a beach", "a nude man in a studio",
                  "an artistic nude portrait"]
        keep = ["a photo of a clothed person", "a woman in a summer dress on a beach",
                "a man in a suit in a studio", "an artistic portrait of a person"]
        return PromptSet("nudity", "nudity", forget, keep, [(p, "clothed") for p in keep], [],
                         ["a photo of a person without clothes", "an unclothed body"])
    known = {name.lower(): name for name in SD_CONCEPTS}
    name = known.get(low, concept)  # a name outside the table is taken for an artist
    row = SD_CONCEPTS.get(name, Concept("style"))
    templates = TEMPLATES[row.kind]
    peers = [p for p, c in SD_CONCEPTS.items() if c.kind == row.kind and p != name]
    cross_kind = "style" if row.kind == "object" else "object"
    cross = [p for p, c in SD_CONCEPTS.items() if c.kind == cross_kind][:5]
    forget = [t.format(name) for t in templates]
    retain_in = [(templates[0].format(p), p) for p in peers]
    retain_cross = [(TEMPLATES[cross_kind][0].format(p), cross_kind, p) for p in cross]
    retain = [t.format(p) for p in peers for t in templates[:2]]
    synonym = [t.format(row.synonym) for t in templates] if row.synonym else []
    return PromptSet(name, row.kind, forget, retain, retain_in, retain_cross, synonym)


def cycle(items: list, n: int) -> list:
    """The first n items of items repeated: n prompts covering a prompt list evenly."""
    return [items[i % len(items)] for i in range(n)]


def forget_set(models: Models, ps: PromptSet, n: int, seed: int, image_folder: str | None = None):
    """The forget set: n latents x_0 drawn by the reference model from the forget prompts with fixed
    seeds, or the images of `image_folder` encoded by the VAE. Returns (x_0, prompts, embeddings)."""
    if image_folder:
        x0 = encode_images(models, load_image_folder(image_folder, models.vae.config.sample_size))
        prompts = cycle(ps.forget, len(x0))
    else:
        prompts = cycle(ps.forget, n)
        x0 = sample(models, prompts, image_seeds(seed, "forget", n), decode=False, progress=True).latents
    return x0.to(models.device), prompts, encode_prompts(models, prompts)


def class_set(models: Models, concept: str, n: int, seed: int) -> torch.Tensor:
    """The forget set of an unconditional model (toy-uncond): n images of the class `concept` (a toy
    shape) drawn as its training data draws them, in every colour and texture, encoded by the VAE.
    The class's own images, not the model's samples: VDU's class setting forgets its training data."""
    from toy import world
    rng = np.random.default_rng([seed, SEED_OFFSET["forget"]])
    images = np.stack([world.draw(concept, world.COLOURS[rng.integers(len(world.COLOURS))],
                                  world.TEXTURES[rng.integers(len(world.TEXTURES))], rng) for _ in range(n)])
    return encode_images(models, torch.from_numpy(images)).to(models.device)


def retain_set(models: Models, ps: PromptSet, n: int, seed: int):
    """The retain set: n latents x_0 drawn by the reference model from the retain prompts (cycled)
    with fixed seeds, disjoint from the forget set's. Returns (x_0, prompts, embeddings)."""
    prompts = cycle(ps.retain, n)
    x0 = sample(models, prompts, image_seeds(seed, "retain", n), decode=False, progress=True).latents
    return x0.to(models.device), prompts, encode_prompts(models, prompts)


# ---------------------------------------------------------------------------------------------
# Plumbing: seed and device, resolving and checking a model, the command line, range checks,
# signals, output folders
# ---------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def seed_and_device(seed: int, device: str = "auto", mixed_precision: str = "no") -> tuple[torch.device, torch.dtype]:
    """Seed everything and return (device, dtype for autocast and frozen weights)."""
    seed_everything(seed)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but this machine has no CUDA GPU; "
                         "use --device cpu (or auto).")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UsageError(f"unknown --device {device!r}: use auto, cpu or cuda.")
    dev = torch.device(device)
    dtypes = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if mixed_precision not in dtypes:
        raise UsageError(f"unknown --mixed-precision {mixed_precision!r}: use no, fp16 or bf16.")
    if mixed_precision == "fp16" and dev.type == "cpu":
        raise UsageError("--mixed-precision fp16 needs a CUDA GPU; on the CPU use bf16 or no.")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dev, dtypes[mixed_precision]


def saved_run(model: str) -> dict | None:
    """The run.json of a saved run folder given as --model (unet/ and run.json, no pipeline of its
    own: the run continues from it), else None. A run.json beside neither unet/ nor adapter weights
    is a run that never finished: refused."""
    folder = Path(model)
    if not (folder / "run.json").exists() or (folder / "model_index.json").exists():
        return None
    if not ((folder / "unet").is_dir() or (folder / LORA_FILE).exists()):
        raise UsageError(f"{model} is not a finished run (run.json but no unet/ or {LORA_FILE}): give a "
                         "run folder a method completed, or a base model.")
    return json.loads((folder / "run.json").read_text())


def load_run_unet(folder: str | Path, device: torch.device | str = "cpu"):
    """The UNet a saved run leaves: its unet/, or for a LoRA run the UNet it started from (the base
    model, or the earlier run it continued) with its adapters merged into the weights."""
    folder = Path(folder)
    if (folder / "unet").is_dir():
        return load_unet(folder / "unet", device)
    start = json.loads((folder / "run.json").read_text())["args"]["model"]
    unet = load_run_unet(start, device) if saved_run(start) else load_unet(resolve_model(start)[0], device)
    unet.load_lora_adapter(str(folder), prefix="unet", weight_name=LORA_FILE)
    unet.fuse_lora()
    unet.unload_lora()  # a plain UNet again: W + B A in its weights
    return unet.eval()


def base_model_name(model: str) -> str:
    """The base model behind --model, as a method's defaults see it: a saved run folder stands for
    the base model its run.json names ('toy', a hub id, a folder); any other name is itself."""
    run = saved_run(model)
    return run["base_model"] if run else model


# Pipeline families (model_index.json's class name starts with the key) the methods here cannot
# train, refused in one sentence before any weight loads; SDXL's text-to-image pipeline is not.
SDXL_PIPELINE = "StableDiffusionXLPipeline"
REFUSED_PIPELINES = {
    "StableDiffusionXL": "of SDXL's pipelines only the text-to-image one (StableDiffusionXLPipeline) is "
                                 "supported: the refiner and the image-conditioned ones condition the UNet otherwise",
    "StableDiffusion3": "SD3 is a flow-matching transformer (MMDiT), not a UNet sampled with DDIM, "
                                "which every method here is written for",
    "Flux": "FLUX is a flow-matching transformer, not a UNet sampled with DDIM, which every method "
                    "here is written for",
}


def model_index(path: str) -> dict:
    """A diffusers folder's or hub id's model_index.json ({} if unknown: offline, not a hub id; the
    loading then says so in its own words)."""
    index = Path(path) / "model_index.json"
    try:
        if not index.exists():
            from huggingface_hub import hf_hub_download
            index = Path(hf_hub_download(path, "model_index.json"))
        return json.loads(index.read_text())
    except Exception:
        return {}


def pipeline_class(path: str) -> str | None:
    """The pipeline class a diffusers folder or hub id declares (model_index.json), None if unknown."""
    return model_index(path).get("_class_name")


def refuse_pipeline(cls: str | None, model: str) -> None:
    if cls == SDXL_PIPELINE:  # SDXL's text-to-image pipeline is supported; its other pipelines are not
        return
    for family, why in REFUSED_PIPELINES.items():
        if cls is not None and cls.startswith(family):
            raise UsageError(f"{model} is a {cls}: {why}; use an SD 1.x, 2.x or SDXL text-to-image model, "
                             "or --model toy.")


def is_unconditional(path: str) -> bool:
    """Whether `path` is a folder of diffusers' unconditional latent pipeline (LDMPipeline)."""
    index = Path(path) / "model_index.json"
    return index.exists() and json.loads(index.read_text()).get("_class_name") == "LDMPipeline"


def load_unconditional(model: str, path: str, toy: dict | None, device: torch.device, dtype: torch.dtype,
                       sample_batch_size: int | None) -> Models:
    """An LDMPipeline folder (toy-uncond): a VAE (in the pipeline's `vqvae` slot), an unconditional
    UNet2DModel, the scheduler; no tokenizer or text encoder."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel
    try:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vqvae", torch_dtype=dtype, use_safetensors=True)
        unet = UNet2DModel.from_pretrained(path, subfolder="unet", torch_dtype=torch.float32, use_safetensors=True)
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
    except (OSError, ValueError) as e:
        raise UsageError(f"could not load the unconditional model in {path}: {str(e).splitlines()[0]}") from None
    check_scheduler(scheduler, model)
    vae.to(device).eval().requires_grad_(False)
    models = Models(model, path, None, None, vae, unet.to(device), scheduler, device, dtype, toy)
    models.sample_batch_size = sample_batch_size or 64
    if toy:
        models.sample_steps = toy["recommended"]["num_inference_steps"]
    return models


# The shipped toy models: the text-to-image toy, and the unconditional one of VDU's class setting
# (the same world, VAE and vocabulary), each with the command that rebuilds it.
TOY_MODELS = {"toy": (TOY_DIR / "pipeline", "python -m toy.build"),
              "toy-uncond": (TOY_DIR / "uncond", "python -m toy.build --only-uncond")}


def resolve_model(model: str) -> tuple[str, dict | None]:
    """'toy' -> the shipped toy pipeline folder (+ its toy.json), 'toy-uncond' the unconditional
    one; else the folder or hub id."""
    if model in TOY_MODELS:
        folder, build = TOY_MODELS[model]
        if not (folder / "model_index.json").exists():
            raise UsageError(f"the toy model is missing from {folder}; rebuild it with `{build}`.")
        return str(folder), json.loads((TOY_DIR / "toy.json").read_text())
    folder = Path(model)
    if folder.exists():
        if not (folder / "model_index.json").exists() and not (folder / "unet").exists():
            raise UsageError(f"{model} is a folder but not a diffusers Stable Diffusion folder "
                             "(no model_index.json).")
        toy_json = folder.parent / "toy.json"  # a copy of the toy keeps its vocabulary
        return str(folder), (json.loads(toy_json.read_text()) if toy_json.exists() else None)
    return model, None


# What the UNet may be trained to output: the noise eps (SD v1.x, SD 2.x-base) or the velocity
# v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (SD 2.x at 768 px). Every loss here is written in
# the model's own output space; for v, a difference of eps predictions at timestep t is
# sqrt(abar_t) times the difference of v predictions, so each loss is the same objective under
# another weighting over t.
PREDICTION_TYPES = ("epsilon", "v_prediction")
# Scheduler settings that change the DDIM step in ways common.ddim_step does not implement: a
# model that sets one is refused rather than sampled differently from diffusers.
UNSUPPORTED_SCHEDULER = {"clip_sample": False, "thresholding": False, "rescale_betas_zero_snr": False}


def check_scheduler(scheduler, model: str) -> None:
    """Refuse, in one sentence, a prediction type or scheduler setting the DDIM step here does
    not handle (it would otherwise sample something other than diffusers' pipeline does)."""
    kind = scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise UsageError(f"{model} predicts {kind!r}; these methods handle {' and '.join(PREDICTION_TYPES)} "
                         "models (SD v1.x, 2.x and SDXL).")
    for key, handled in UNSUPPORTED_SCHEDULER.items():
        if scheduler.config.get(key, handled) != handled:
            raise UsageError(f"{model}'s scheduler sets {key}={scheduler.config.get(key)}, which the DDIM step "
                             f"here does not implement; set it to {handled} in its scheduler config to use it.")


def with_sdxl_inputs(unet: torch.nn.Module, model: str = "the model", pooled: int | None = None) -> torch.nn.Module:
    """Install (once) the hook that unpacks an SDXL conditioning's extra token for `unet`; `pooled`,
    the second text encoder's embedding size where known, must match what the UNet takes."""
    takes = unet.config.projection_class_embeddings_input_dim - N_TIME_IDS * unet.config.addition_time_embed_dim
    if pooled is not None and pooled != takes:
        raise UsageError(f"{model}'s UNet does not take SDXL base's {N_TIME_IDS} size ids beside its pooled text "
                         "embedding (an SDXL refiner?); only SDXL's text-to-image base model is supported.")
    pooled = takes
    if pooled + N_TIME_IDS > unet.config.cross_attention_dim:
        raise UsageError(f"{model}'s UNet takes a pooled embedding of {pooled} numbers, more than one token of its "
                         f"{unet.config.cross_attention_dim}-number text states can carry beside its time ids.")
    if not getattr(unet, "sdxl_inputs", False):
        unet.register_forward_pre_hook(functools.partial(unpack_sdxl_inputs, pooled=pooled), with_kwargs=True)
        unet.sdxl_inputs = True
    return unet


def unpack_sdxl_inputs(unet, args: tuple, kwargs: dict, pooled: int):
    """Before each UNet call: the last token of encoder_hidden_states -> added_cond_kwargs (a call
    that passes added_cond_kwargs itself, as diffusers' pipelines do, goes through untouched)."""
    if kwargs.get("added_cond_kwargs") is not None:
        return args, kwargs
    if len(args) > 3:
        raise TypeError("an SDXL UNet here takes (sample, timestep, encoder_hidden_states) by position, the rest "
                        "by name")
    if len(args) == 3:  # encoder_hidden_states given by position
        args, kwargs = args[:2], {**kwargs, "encoder_hidden_states": args[2]}
    c = kwargs["encoder_hidden_states"]
    kwargs["encoder_hidden_states"] = c[:, :-1]
    kwargs["added_cond_kwargs"] = {"text_embeds": c[:, -1, :pooled],
                                   "time_ids": c[:, -1, pooled:pooled + N_TIME_IDS]}
    return args, kwargs


def load_unet(path: str | Path, device: torch.device | str = "cpu"):
    """A UNet alone: a UNet folder, a pipeline folder (its unet/), or a hub id with a unet/; a
    local folder whose config names UNet2DModel loads as that (toy-uncond's, unconditional)."""
    from diffusers import UNet2DConditionModel, UNet2DModel
    path = Path(path)
    sub = "unet" if (path / "unet").exists() or not path.exists() else None
    config = path / (sub or "") / "config.json"
    unconditional = config.exists() and json.loads(config.read_text()).get("_class_name") == "UNet2DModel"
    try:
        unet = (UNet2DModel if unconditional else UNet2DConditionModel).from_pretrained(
            str(path), subfolder=sub, use_safetensors=True, torch_dtype=torch.float32)
    except OSError:
        raise UsageError(f"could not load a UNet from {str(path)!r} (not a UNet folder, or offline).") from None
    if getattr(unet.config, "addition_embed_type", None) == "text_time":  # SDXL's
        with_sdxl_inputs(unet, str(path))
    return unet.to(device).eval()


def arg(default, help: str, check: str | None = None, **kwargs):
    """A dataclass field with a help string, an optional range `check` for numbers (a key of
    RANGES: ">=1", ">0", "(0,1)", ...) and optional argparse `choices`."""
    if check is not None and check not in RANGES:
        raise ValueError(f"unknown range check {check!r}: use one of {', '.join(RANGES)}")
    meta = {"help": help, **kwargs, **({"check": check} if check else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def parse_args(cls, argv: list[str] | None = None):
    """Build an argparse parser from the dataclass `cls` and return a filled instance.

    `bool` fields become `--flag / --no-flag`, `list[str]` fields take several values, and a
    default of None means "resolved later" (toy vs SD defaults, see `fill_defaults`).
    """
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(description=(sys.modules[cls.__module__].__doc__ or "").strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    shared = {f.name for f in dataclasses.fields(RunArgs)} - {"concept", "model"}
    fields = dataclasses.fields(cls)  # --help: concept and model, the script's own, then RunArgs' rest
    for f in [f for f in fields if f.name not in shared] + [f for f in fields if f.name in shared]:
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # Optional[X] / X | None
            kind = [a for a in typing.get_args(kind) if a is not type(None)][0]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        help_text += " (default: %(default)s)" if default not in (None, []) else ""
        kw = dict(default=default, help=help_text)
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        name = "--" + f.name.replace("_", "-")
        if f.name == "concept":  # repeatable: several concepts in one run, kept joined by CONCEPT_JOIN
            parser.add_argument(name, action="append", **{**kw, "default": None})
        elif kind is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(kind) is list:
            parser.add_argument(name, nargs="*", type=typing.get_args(kind)[0], **kw)
        else:
            parser.add_argument(name, type=kind, **kw)
    values = vars(parser.parse_args(argv))
    if "concept" in values:
        values["concept"] = CONCEPT_JOIN.join(values["concept"]) if values["concept"] else ""
    return cls(**values)


def fill_defaults(args, defaults: dict, lora_lr: float | None = None) -> None:
    """Set every field of `args` that is still None from `defaults` (the toy or the SD column).
    With --train lora an unset --lr is `lora_lr`: adapters start at zero and few weights train, so
    they take their own, larger step."""
    if getattr(args, "train", None) == "lora" and args.lr is None:
        args.lr = lora_lr
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def parse_run_args(cls, argv: list[str] | None, toy_defaults: dict, sd_defaults: dict,
                   lora_lr: dict | None = None):
    """A training script's command line: parsed, the toy or the SD column of defaults filled in (by
    the base model, so a saved run continues with its base's column), every number checked."""
    args = parse_args(cls, argv)
    column = "toy" if base_model_name(args.model) == "toy" else "sd"
    fill_defaults(args, toy_defaults if column == "toy" else sd_defaults, (lora_lr or {}).get(column))
    check_ranges(args)
    return args


# The ranges a numeric argument can declare (`arg(..., check=...)`): the test, and the range in words.
RANGES = {
    ">=0": (lambda v: v >= 0, "at least 0"),
    ">=1": (lambda v: v >= 1, "at least 1"),
    ">=4": (lambda v: v >= 4, "at least 4"),
    ">0": (lambda v: v > 0, "greater than 0"),
    "(0,1)": (lambda v: 0 < v < 1, "in (0, 1)"),
    "(0,1]": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "[0,1]": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "[0,1)": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "timestep": (lambda v: 0 <= v < 1000, "a training timestep, in [0, 1000)"),
}


@dataclass
class RunArgs:
    """The arguments every method and baseline takes (what to forget, the model, devices and
    outputs). Each script's Args adds its own and may redeclare one of these to change its help or
    default; --help lists the concept and model first, then the script's own, then the rest."""
    concept: str = arg("", "what to forget: a toy concept (circle, striped, ...) or an SD concept ('Van Gogh', "
                           "'church', 'nudity'); repeat the flag for several")
    model: str = arg(DEFAULT_MODEL, "'toy', a hub id, a local diffusers folder, or a saved run to continue")
    forget_prompts: list[str] = arg([], "override the forget prompts (or @file.txt)")
    retain_prompts: list[str] = arg([], "override the retain prompts (or @file.txt)")
    gradient_checkpointing: bool = arg(False, "trade compute for memory in the UNet")
    mixed_precision: str = arg("no", "autocast dtype", choices=["no", "fp16", "bf16"])
    device: str = arg("auto", "auto, cpu or cuda", choices=["auto", "cpu", "cuda"])
    sample_batch_size: int = arg(None, "prompts per sampling batch (default: 64 toy, 8 SD; lower it if sampling "
                                       "runs out of memory)", ">=1")
    seed: int = arg(0, "seed of the run's data, training and evaluation", ">=0")
    n_eval_images: int = arg(64, "images per evaluation group in the final report (0: skip)", ">=0")
    output_dir: str = arg(None, "where to save (default outputs/<script>-<concept>)")
    overwrite: bool = arg(False, "replace an existing output folder")
    save_half: bool = arg(False, "save the UNet in float16 (SD v1.4: 3.4 GB -> 1.7 GB)")


def check_ranges(args) -> None:
    """Every number of `args` finite, and within the range its field declares (`arg(check=...)`),
    or a one-sentence UsageError naming the flag."""
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        flag = "--" + f.name.replace("_", "-")
        if not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value}.")
        if "check" in f.metadata:
            ok, words = RANGES[f.metadata["check"]]
            if not ok(value):
                raise UsageError(f"{flag} must be {words}, got {value}.")


# Set by SIGTERM. Python raises the signal's KeyboardInterrupt wherever the main thread happens to
# be, and an exception raised inside a finalizer (`__del__`, a weakref callback) is only printed and
# dropped; the flag makes sure such a run still saves nothing.
STOP_REQUESTED = threading.Event()


def cli(main) -> None:
    """Run `main()`, turning a UsageError into one clear line on stderr and exit code 2. Ctrl-C
    and SIGTERM (a timeout, a cluster's preemption) stop the run the same way: the temporary
    output folder is removed and nothing is saved."""
    def terminated(signum, frame):
        STOP_REQUESTED.set()
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, terminated)
    try:
        main()
        if STOP_REQUESTED.is_set():  # the signal's exception was swallowed (say, inside a __del__)
            raise KeyboardInterrupt
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: nothing was saved.", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        # the output folder is already cleaned up; exit at once rather than wait for worker
        # threads (a model loader's, say) that the interruption left waiting
        os._exit(130)


def read_prompt_list(values: list[str] | None) -> list[str] | None:
    """`--forget-prompts "a" "b"` or `--forget-prompts @file.txt` (one prompt per line)."""
    if not values:
        return None
    out = []
    for v in values:
        if v.startswith("@"):
            path = Path(v[1:])
            if not path.exists():
                raise UsageError(f"prompt file {path} does not exist.")
            out += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        else:
            out.append(v)
    return out


def toy_words(toy: dict) -> set[str]:
    v = toy["vocabulary"]
    return set(v["shape"] + v["colour"] + v["texture"] + list(v["synonyms"].values()) + v["filler"])


def toy_concepts_sentence(toy: dict) -> str:
    v = toy["vocabulary"]
    return (f"shapes: {', '.join(v['shape'])}; colours: {', '.join(v['colour'])}; "
            f"textures: {', '.join(v['texture'])}")


def check_toy_prompt(prompt: str, toy: dict) -> None:
    unknown = [w for w in prompt.lower().split() if w not in toy_words(toy)]
    if unknown:
        raise UsageError(f"the toy model does not know the word(s) {', '.join(map(repr, unknown))} in "
                         f"prompt {prompt!r}; the toy concepts are {toy_concepts_sentence(toy)}.")


def load_image_folder(folder: str, size: int) -> torch.Tensor:
    """A folder of images -> (n, 3, size, size) in [-1, 1] (for user-supplied real forget images)."""
    from PIL import Image
    if not Path(folder).is_dir():
        raise UsageError(f"--forget-images {folder} is not a folder; give a folder of .png/.jpg/.webp images.")
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not paths:
        raise UsageError(f"no .png/.jpg/.webp images found in {folder}.")
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size))) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


class _TrainingBar(tqdm):
    """tqdm that stops the loop at the next step once a SIGTERM was seen (see STOP_REQUESTED)."""
    def __iter__(self):
        for step in super().__iter__():
            if STOP_REQUESTED.is_set():
                raise KeyboardInterrupt
            yield step


def progress(n: int, desc: str):
    """The progress bar of every training loop: `desc`, the step count, the loss terms (`show`)."""
    return _TrainingBar(range(n), desc=desc, dynamic_ncols=True)


def show(bar, terms: dict) -> None:
    """Write the current loss terms into the progress bar, all in one format."""
    bar.set_postfix({k: f"{float(v):.4g}" for k, v in terms.items()}, refresh=False)


def slug(text: str) -> str:
    return re.sub("-+", "-", "".join(c if c.isalnum() else "-" for c in text.lower())).strip("-") or "concept"


def default_output_dir(method: str, concept: str) -> Path:
    return Path("outputs") / f"{method}-{slug(concept)}"


@contextlib.contextmanager
def output_folder(path: str | Path, overwrite: bool = False):
    """Yield a temporary folder; on success it replaces `path`, on any failure it is removed.

    An existing non-empty `path` is refused up front unless `overwrite` (before any work is done),
    so an interrupted or failed run never leaves a half-written result behind.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"the output folder {path} already exists and is not empty; pass --overwrite "
                         "to replace it or choose another --output-dir.")
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if STOP_REQUESTED.is_set():
        # a SIGTERM whose KeyboardInterrupt some library code swallowed: still save nothing
        shutil.rmtree(tmp, ignore_errors=True)
        raise KeyboardInterrupt
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def versions() -> dict:
    import diffusers
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def save_run(folder: Path, unet: torch.nn.Module, args, models: Models, started: float, **extra) -> dict:
    """unet/ (diffusers format, safetensors; float16 if `args.save_half`, the run's last use of
    the UNet) and run.json (every field of the `args` dataclass as given, the model, versions,
    time, memory, and `extra`)."""
    if getattr(args, "save_half", False):
        unet.to(torch.float16)  # halves the file; diffusers loads it as it is, or cast with torch_dtype
    if has_lora(unet):  # the adapters alone, as diffusers' pipelines load them (load_lora_weights)
        save_lora(folder, unet)
    else:
        unet.save_pretrained(folder / "unet", safe_serialization=True)
    run = {"args": dataclasses.asdict(args), "base_model": models.name, "base_model_path": models.path,
           # chaining: the saved runs this one continued, oldest first (the base model is the original)
           **({"chain": models.chain} if models.chain else {}),
           "versions": versions(), "device": str(models.device),
           "wall_time_s": round(time.time() - started, 1),
           "peak_memory_mb": round(peak_memory_mb(models.device), 1), **extra}
    if getattr(args, "mixed_precision", "no") == "fp16":
        run["fp16_skipped_steps"] = LossScaler.skipped
        if LossScaler.skipped:
            print(f"fp16: {LossScaler.skipped} optimiser steps overflowed and were skipped (they still "
                  "count toward the run's steps)")
    (folder / "run.json").write_text(json.dumps(run, indent=2))
    return run


LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for


def save_lora(folder: Path, unet: torch.nn.Module) -> None:
    """A LoRA run's result: its adapters in diffusers' format (safetensors, a few hundred kB on the
    toy), which `pipe.load_lora_weights(folder)` puts on the pipeline the run started from."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)


def image_grid(images: torch.Tensor, path: str | Path, row_labels: list[str] | None = None,
               col_labels: list[str] | None = None, min_cell: int = 96) -> None:
    """images (rows, cols, 3, H, W) in [-1, 1] -> a labelled PNG grid (small images are enlarged)."""
    from PIL import Image, ImageDraw
    rows, cols, _, h, w = images.shape
    scale = max(1, min_cell // max(h, w))
    ch, cw, pad = h * scale, w * scale, 4
    left = 7 * max((len(l) for l in row_labels), default=0) + 10 if row_labels else 0
    top = 16 if col_labels else 0
    canvas = Image.new("RGB", (left + cols * (cw + pad) + pad, top + rows * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(col_labels or []):
        draw.text((left + pad + c * (cw + pad), 2), label, fill="black")
    for r in range(rows):
        if row_labels:
            draw.text((4, top + pad + r * (ch + pad) + ch // 2 - 5), row_labels[r], fill="black")
        for c in range(cols):
            arr = ((images[r, c].float().permute(1, 2, 0).cpu().numpy() + 1) * 127.5).clip(0, 255)
            tile = Image.fromarray(arr.astype(np.uint8)).resize((cw, ch), Image.NEAREST)
            canvas.paste(tile, (left + pad + c * (cw + pad), top + pad + r * (ch + pad)))
    canvas.save(path)
