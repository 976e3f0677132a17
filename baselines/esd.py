"""ESD, a BASELINE: erasing a concept by negative guidance.

Source: Gandikota, Materzynska, Fiotto-Kaufman, Bau, "Erasing Concepts from Diffusion Models"
(ICCV 2023; public paper and code). Every one of the four methods of this project compares itself
with ESD; it is here so that their numbers stand beside one a reader already knows.

The idea in one line: a frozen copy of the starting UNet already knows how to steer AWAY from the
concept (classifier-free guidance with a negative scale), so the trained UNet is taught to
predict, for the concept's prompt, what that negative guidance would have predicted.

    target(x_t, t) = eps*(x_t, "", t) - eta * (eps*(x_t, c, t) - eps*(x_t, "", t))
    L              = E || eps_theta(x_t, c, t) - sg(target(x_t, t)) ||^2

eps* is the frozen starting UNet (the reference), eps_theta the one that trains, sg a
stop-gradient. x_t is not a noised training image: it is a state of the model's own DDIM
trajectory for the concept's prompt, stopped at a random step. There is no retain term: ESD keeps
the rest only by training few parameters (`--train`: cross-attention for styles, everything else
for objects). The derivation and the defaults: docs/methods/esd.md.

    python baselines/esd.py --model toy --concept circle     # CPU, offline, about a minute
    python baselines/esd.py --concept "Van Gogh"              # Stable Diffusion v1.4, GPU
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: common.py is one level up
import common  # noqa: E402
import eval as evaluation  # noqa: E402

# --- Arguments ---


@dataclass
class Args(common.RunArgs):
    train: str = common.arg(None, "which UNet parameters train: xattn (ESD-x), noxattn (ESD-u) or full; "
                                  "default by the concept's kind: xattn for styles, textures and colours, "
                                  "noxattn for objects, shapes and nudity",
                            choices=["full", "xattn", "noxattn", "lora"])
    lora_rank: int = common.arg(4, "--train lora: the adapters' rank r", ">=1")
    lora_on: str = common.arg(None, "--train lora: the attention layers wrapped (xattn: cross, noxattn: "
                              "self, full: both); default: the layers of the kind's --train", choices=list(common.LORA_LAYERS))
    steps: int = common.arg(None, "optimiser steps", ">=1")
    lr: float = common.arg(None, "Adam learning rate", ">0")
    negative_guidance: float = common.arg(1.0, "eta: how far the target steps away from the concept", ">0")
    sample_guidance: float = common.arg(3.0, "guidance of the DDIM trajectories that give x_t", ">=0")
    sample_steps: int = common.arg(None, "DDIM steps of those trajectories (x_t stops at a random one)", ">=1")
    batch_size: int = common.arg(None, "trajectories (prompts) per step", ">=1")
    retain_prompts: list[str] = common.arg([], "override the retain prompts used by the evaluation (or @file.txt)")


# Where the toy and Stable Diffusion defaults differ. SD: the paper's and its original code's
# (1000 iterations of one prompt, lr 1e-5, 50 DDIM steps). Toy: a search over 10 concepts,
# docs/methods/esd.md "Defaults" and its search in docs/lab/.
SD_DEFAULTS = dict(steps=1000, lr=1e-5, sample_steps=50, batch_size=1)
TOY_DEFAULTS = dict(steps=150, sample_steps=20, batch_size=8)
# On the toy the learning rate that forgets without wrecking the neighbours differs tenfold
# between the two variants (cross-attention is 5% of the UNet), so it follows --train.
TOY_LR = {"xattn": 1e-4, "noxattn": 1.5e-5, "full": 1.5e-5}
# --train lora: LoRA's B starts at zero and few weights train, so a larger step than full weights
# (toy: chosen on seed 0, docs/lab/searches/esd_lora.md; SD: tenfold the paper's rate, not measured)
LORA_LR = dict(toy=3e-4, sd=1e-4)

# ESD's rule for what trains: cross-attention holds how a word is drawn (styles), the rest holds
# what is drawn (objects). The toy's textures and colours play the part of styles.
# Several concepts of different kinds in one run (a shape and a texture): the whole UNet, what
# each kind's rule trains together (ours: the ESD paper erases one concept at a time).
TRAIN_BY_KIND = {"style": "xattn", "texture": "xattn", "colour": "xattn",
                 "object": "noxattn", "shape": "noxattn", "nudity": "noxattn", "mixed": "full"}


def parse_args(argv: list[str] | None = None) -> Args:
    """The command line, with the toy or the SD column filled in and every number checked; --train
    follows the concept's kind, and on the toy --lr follows --train."""
    args = common.parse_args(Args, argv)
    toy = common.base_model_name(args.model) == "toy"
    by_kind = TRAIN_BY_KIND[common.concept_kind(args.concept, args.model)]
    args.train = args.train or by_kind
    args.lora_on = args.lora_on or by_kind  # LoRA wraps the attention layers of ESD-x or ESD-u
    defaults = TOY_DEFAULTS | dict(lr=TOY_LR.get(args.train)) if toy else SD_DEFAULTS
    common.fill_defaults(args, defaults, LORA_LR["toy" if toy else "sd"])
    common.check_ranges(args)
    return args


# --- Setup ---

def setup(args: Args):
    """Seed and device, the models, the prompt sets, the frozen starting UNet eps*, and theta:
    the parameters chosen by --train."""
    device, dtype = common.seed_and_device(args.seed, args.device, args.mixed_precision)
    models = common.load_models(args.model, device, dtype, args.sample_batch_size)
    ps = common.concept_prompts(args.concept, models, common.read_prompt_list(args.forget_prompts),
                                common.read_prompt_list(args.retain_prompts))
    unet_ref = common.reference(models.unet, args.train)      # eps*: the starting UNet, frozen
    # Ours differs (ESD-u): `noxattn` trains everything outside attn2; the original script also
    # freezes the time embedding and the output layers (conv_norm_out, conv_out).
    params = common.select_trainable(models.unet, args.train, lora_rank=args.lora_rank, lora_on=args.lora_on)  # theta
    if args.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
    return models, ps, unet_ref, params


# --- Data ---

@torch.no_grad()
def trajectory_state(models: common.Models, unet, cond: torch.Tensor, uncond: torch.Tensor, stop: int,
                     guidance: float, n_steps: int, g: torch.Generator):
    """x_t: run `stop` guided DDIM steps (eta = 0) of `unet` from pure noise for the prompts `cond`,
    and return the state there with its timestep t (the state before step `stop`)."""
    sched = models.scheduler
    sched.set_timesteps(n_steps)
    timesteps = sched.timesteps.tolist()
    unet_cfg = unet.config
    x = torch.randn((len(cond), unet_cfg.in_channels, unet_cfg.sample_size, unet_cfg.sample_size), generator=g)
    x = x.to(models.device) * sched.init_noise_sigma
    prev_timesteps = common.previous_timesteps(timesteps).tolist()
    for t, t_prev in zip(timesteps[:stop], prev_timesteps):
        with common.autocast(models.device, models.dtype):
            eps = common.guided_eps(unet, x, t, cond, uncond, guidance).float()
        x = common.ddim_step(sched, eps, t, t_prev, x)[0]
    return x, timesteps[stop]


# --- Loss ---

def esd_target(unet_ref, x_t: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor, eta: float):
    """target = eps*(x_t, "", t) - eta * (eps*(x_t, c, t) - eps*(x_t, "", t)), from the FROZEN
    starting UNet, under no_grad: the target is a constant the trained UNet moves towards."""
    with torch.no_grad():
        both = unet_ref(torch.cat([x_t, x_t]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.float()
        eps_u, eps_c = both.chunk(2)
        return eps_u - eta * (eps_c - eps_u)


def loss(unet, unet_ref, models: common.Models, x_t, t, cond, uncond, eta: float):
    """The whole objective, as (total, terms):

        L = mean || eps_theta(x_t, c, t) - sg(eps*(x_t, "", t) - eta (eps*(x_t, c, t) - eps*(x_t, "", t))) ||^2
    """
    with common.autocast(models.device, models.dtype):
        target = esd_target(unet_ref, x_t, t, cond, uncond, eta)
        eps_theta = unet(x_t, t, encoder_hidden_states=cond).sample
    l_esd = (eps_theta.float() - target).pow(2).mean()
    return l_esd, {"L_ESD": l_esd}


# --- Training ---

def train(args: Args, models: common.Models, unet_ref, params, ps: common.PromptSet) -> None:
    """Each step: a batch of forget prompts, their DDIM trajectories stopped at one random step,
    one gradient step on L. The trajectories are drawn with the model being trained (no
    gradient), as in the public code: as it forgets, x_t moves to where it now goes."""
    unet = models.unet.train()
    opt = torch.optim.Adam(params, lr=args.lr)
    scaler = common.loss_scaler(args.mixed_precision, models.device)
    g = torch.Generator().manual_seed(args.seed)
    bar = common.progress(args.steps, "ESD")
    for step in bar:
        prompts = [ps.forget[i] for i in torch.randint(0, len(ps.forget), (args.batch_size,), generator=g)]
        cond = common.encode_prompts(models, prompts)
        uncond = common.encode_prompts(models, [""] * len(prompts))
        stop = int(torch.randint(0, args.sample_steps, (1,), generator=g))
        x_t, t = trajectory_state(models, unet, cond, uncond, stop, args.sample_guidance, args.sample_steps, g)
        total, terms = loss(unet, unet_ref, models, x_t, t, cond, uncond, args.negative_guidance)
        common.check_finite(step, loss=total)
        opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()  # fp16 loss scaling (a no-op otherwise)
        scaler.step(opt)
        scaler.update()
        common.show(bar, {k: v.item() for k, v in terms.items()})


# --- Save and report ---

def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.time()
    out = args.output_dir or common.default_output_dir("esd", args.concept)
    with common.output_folder(out, args.overwrite) as folder:
        models, ps, unet_ref, params = setup(args)
        train(args, models, unet_ref, params, ps)
        metrics = evaluation.save_and_report(folder, models, ps, models.unet, unet_ref, args, started,
                                             args.n_eval_images, args.seed, method="ESD (baseline)")
    print(f"saved to {out}")
    return metrics


if __name__ == "__main__":
    common.cli(main)
