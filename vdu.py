"""VDU: variational diffusion unlearning (plasticity inducer + stability regularizer).

Source: Panda, Varun, Jain, Maharana, Prathosh, "Variational Diffusion Unlearning: A Variational
Inference Framework for Unlearning in Diffusion Models under Data Constraints", arXiv 2510.04058
(TMLR). Public here: the abstract, summaries and the authors' method diagram. Setting: only the
forget data D_f is available, no retain data.

The ideal unlearned posterior is p(theta | D_r) ∝ p(theta | D) / p(D_f | theta). Fitting a
variational q(theta) to it splits into a stability term (stay near p(theta | D), approximated by
a diagonal Gaussian N(mu*, diag sigma*^2)) and a plasticity term (make D_f unlikely, with
log p(x | theta) replaced by the diffusion ELBO). With q concentrated at theta:
    L(theta) = -(1 - gamma) A(theta) + gamma B(theta)
    A = E_{x in D_f, t, eps} C_t ||eps - eps_theta(x_t, c, t)||^2      (ascended: plasticity)
    B = sum_i (theta_i - mu*_i)^2 precision_i / 2                        (stability)
Where mu* and precision = 1/sigma*^2 come from (`--precision-from`):
  checkpoints  the paper's recipe: mean/variance over several models of one architecture (the
               toy ships snapshot checkpoints; on SD the v1.x family is the nearest analogue,
               and those are NOT independent runs);
  fisher       a diagonal Laplace approximation at the reference (documented deviation, close
               to the authors' earlier PBU), on images the model draws from the empty prompt;
  l2           isotropic precision: a plain L2 anchor, the ablation baseline.
Reconstructed where the public text is silent: C_t (the diagram writes a generic C_t; C_t = 1,
L_simple, is our choice, the ELBO weights are --elbo-weights, and --t-min puts C_t = 1 on the noisier
timesteps only, where a sample's content is decided), the normalisation of every
precision to mean 1 (so gamma means the same for all three sources), the precision floor, the
divergence stop, and the optional per-sample bound on the ascent (`--ascent-bound`).
The derivation and the evidence behind the defaults: docs/methods/vdu.md.

Two settings share everything but the UNet call. The paper's own: a class forgotten by an
unconditional model (--model toy-uncond: the forget set is the class's images, A is the plain
denoising loss, the report counts each class among 512 samples). Its secondary one, which the
other methods share: a concept forgotten by a text-to-image model (A conditioned on the prompt).

    python vdu.py --model toy --concept circle          # CPU, offline
    python vdu.py --model toy-uncond --concept circle   # the class setting, CPU, offline
    python vdu.py --concept "Van Gogh"                   # Stable Diffusion v1.4, GPU (Fisher precision)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

import common
import eval as evaluation

# --- Arguments ---


@dataclass
class Args(common.RunArgs):
    model: str = common.arg(common.DEFAULT_MODEL, "'toy', 'toy-uncond' (unconditional: a class setting), a hub "
                                                  "id or a local diffusers folder")
    train: str = common.arg("full", "which UNet parameters train (lora is refused: the prior is on weights a "
                                  "fresh adapter does not have)",
                            choices=["full", "xattn", "noxattn", "lora"])
    precision_from: str = common.arg(None, "where mu* and the precision come from",
                                     choices=["checkpoints", "fisher", "l2"])
    checkpoints: list[str] = common.arg([], "UNets of the same architecture (folders or hub ids with "
                                            "a unet/ subfolder) for --precision-from checkpoints; the "
                                            "reference counts as one (toy default: its snapshots)")
    anchor: str = common.arg("start", "mu*: the reference's weights (start), or the mean of the checkpoints",
                             choices=["start", "mean"])
    precision_floor: float = common.arg(0.1, "floor added to sigma*^2, as a fraction of its median "
                                             "(checkpoints), or lambda0 relative to the mean Fisher", ">=0")
    fisher_samples: int = common.arg(32, "empty-prompt images for --precision-from fisher", ">=1")
    gamma: float = common.arg(None, "weight of stability B against plasticity A (0: no stability term, "
                                    "plain gradient ascent, the ablation baseline)", "[0,1)")
    elbo_weights: bool = common.arg(False, "C_t = the DDPM ELBO weights instead of 1 (L_simple)")
    t_min: int = common.arg(0, "reconstructed: C_t = 0 below this timestep (the ascent pushes only where "
                               "noise is high and the content is decided; 0: every timestep)", "timestep")
    ascent_bound: float = common.arg(None, "reconstructed: stop the gradient of samples whose loss "
                                           "exceeds this many times the reference's (0: off)", ">=0")
    divergence: float = common.arg(100.0, "stop (saving nothing) if A exceeds this many times the "
                                          "reference's", ">0")
    steps: int = common.arg(None, "optimiser steps", ">=1")
    lr: float = common.arg(None, "Adam learning rate", ">0")
    n_forget: int = common.arg(None, "forget images generated by the reference model", ">=1")
    batch_size: int = common.arg(None, "forget images per step", ">=1")
    retain_prompts: list[str] = common.arg([], "override the retain prompts used only by evaluation (or @file.txt)")
    forget_images: str = common.arg(None, "a folder of real forget images instead of generated ones")
    n_eval_images: int = common.arg(None, "images per evaluation group in the final report (unconditional: "
                                          "samples per model; 0: skip)", ">=0")


# Where the toy and Stable Diffusion defaults differ. Evidence: docs/methods/vdu.md, "Defaults".
SD_DEFAULTS = dict(precision_from="fisher", gamma=0.95, ascent_bound=0.0, steps=200, lr=1e-5, n_forget=100,
                   batch_size=4, n_eval_images=64)
# Toy gamma: a search over 10 concepts x 3 seeds, by a rule fixed before the runs (docs/lab/).
TOY_DEFAULTS = dict(precision_from="fisher", gamma=0.35, ascent_bound=3.0, steps=200, lr=5e-4, n_forget=64,
                    batch_size=16, n_eval_images=64)
# The class setting (toy-uncond): the toy's settings until a search on seeds 0-2 says otherwise;
# the report judges 512 samples of each model.
UNCOND_DEFAULTS = {**TOY_DEFAULTS, "n_eval_images": 512}
DEFAULTS = {"toy": TOY_DEFAULTS, "toy-uncond": UNCOND_DEFAULTS}


def parse_args(argv: list[str] | None = None) -> Args:
    """The command line, with the toy or the SD column filled in and every number checked. On the
    toy, --precision-from checkpoints defaults to the snapshot UNets the toy world ships."""
    args = common.parse_args(Args, argv)
    if args.train == "lora":
        raise common.UsageError("VDU does not train LoRA adapters: its stability term is a prior on each "
                                "trained weight (mean and precision from checkpoints or the Fisher), which "
                                "a fresh adapter does not have; use --train full, xattn or noxattn.")
    base = common.base_model_name(args.model)  # a saved run continues from the model it names
    common.fill_defaults(args, DEFAULTS.get(base, SD_DEFAULTS))
    common.check_ranges(args)
    if args.precision_from == "checkpoints" and not args.checkpoints:
        if base not in DEFAULTS:
            raise common.UsageError("--precision-from checkpoints needs --checkpoints (e.g. the SD v1.x "
                                    "family); or use --precision-from fisher.")
        snapshots = common.TOY_DIR / ("snapshots" if base == "toy" else "uncond/snapshots")
        args.checkpoints = [str(p) for p in sorted(snapshots.iterdir())]
    if base == "toy-uncond" and args.train != "full":
        raise common.UsageError("an unconditional model has no cross-attention: use --train full with toy-uncond.")
    return args


# --- Setup ---

def setup(args: Args):
    """Seed and device, the models, the prompt sets, the frozen reference eps_ref, theta: the UNet
    parameters chosen by --train (printed with their count), and the frozen prior of the stability
    term: mu* and the precision of every trained parameter (--precision-from)."""
    device, dtype = common.seed_and_device(args.seed, args.device, args.mixed_precision)
    models = common.load_models(args.model, device, dtype, args.sample_batch_size, unconditional_ok=True)
    ps = common.concept_prompts(args.concept, models, common.read_prompt_list(args.forget_prompts),
                                common.read_prompt_list(args.retain_prompts))
    if not models.conditional:
        common.one_concept(ps, "VDU's class setting", "its report follows one class's share")
    unet_ref = common.frozen_copy(models.unet)                 # eps_ref: the reference, frozen
    params = common.select_trainable(models.unet, args.train)  # theta: what trains
    if args.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
    anchor, precision = precision_and_anchor(models, params, args.precision_from, args.checkpoints, args.anchor,
                                             args.precision_floor, args.fisher_samples, args.seed)  # mu*, 1/sigma*^2
    return models, ps, unet_ref, params, anchor, precision


def precision_and_anchor(models: common.Models, params, source: str, checkpoints: list[str] = (),
                         anchor: str = "start", floor: float = 0.1, fisher_samples: int = 32, seed: int = 0):
    """mu* and the precision (normalised to mean 1) of every trained parameter, from `source`:
    checkpoints (mean / variance over the reference and `checkpoints`), fisher, or l2."""
    names = [n for n, p in models.unet.named_parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    if source == "l2":
        return start, [torch.ones_like(p) for p in params]
    if source == "checkpoints":
        # Welford over the reference + checkpoints: mean and variance of every parameter
        mean = [p.clone() for p in start]
        m2 = [torch.zeros_like(p) for p in start]
        for k, path in enumerate(tqdm(checkpoints, desc="checkpoints"), start=2):
            other = dict(common.load_unet(path).named_parameters())
            for i, n in enumerate(names):
                x = other[n].detach().to(mean[i].device, torch.float32)
                d = x - mean[i]
                mean[i] += d / k
                m2[i] += d * (x - mean[i])
        var = [m / (len(checkpoints)) for m in m2]
        flat = torch.cat([v.flatten() for v in var])
        # reconstructed: a floor relative to the median variance (tiny but positive if it is 0)
        floor = max(floor * flat.median().item(), 1e-12)
        # precision = 1 / (sigma*^2 + floor): high where the checkpoints agree
        precision = [1.0 / (v + floor) for v in var]
        mu = mean if anchor == "mean" else start
    else:  # fisher: lambda0 + N * E[(d loss / d theta)^2] on the model's own empty-prompt samples
        n = fisher_samples
        x0 = common.sample(models, [""] * n, common.image_seeds(seed, "fisher", n), decode=False).latents
        x0 = x0.to(models.device)
        fisher = [torch.zeros_like(p) for p in params]
        g = torch.Generator().manual_seed(seed + 2)
        empty = common.encode_prompts(models, [""]).float() if models.conditional else None
        for i in tqdm(range(n), desc="Fisher"):
            x_t, t, eps = common.add_noise(models.scheduler, x0[i:i + 1], g)
            # float32 whatever --mixed-precision says: squared fp16 gradients, unscaled, underflow
            denoise = (common.unet_output(models.unet, x_t.float(), t, empty).float() - eps).pow(2).mean()
            grads = torch.autograd.grad(denoise, params)
            for f, gr in zip(fisher, grads):
                f += gr.float() ** 2
        mean_f = torch.cat([f.flatten() for f in fisher]).mean()
        precision = [f + floor * mean_f for f in fisher]
        mu = start
    scale = torch.cat([p.flatten() for p in precision]).mean()
    return mu, [p / scale for p in precision]


# --- Data ---

def make_data(args: Args, models: common.Models, ps: common.PromptSet):
    """D_f only (the method's premise): latents drawn by the reference model from the forget
    prompts with fixed seeds, or real images; for an unconditional model, the class's images
    (no prompts: c_f is None)."""
    if not models.conditional:
        return dict(x0_f=common.class_set(models, ps.concept, args.n_forget, args.seed), c_f=None)
    x0_f, _, c_f = common.forget_set(models, ps, args.n_forget, args.seed, args.forget_images)
    return dict(x0_f=x0_f, c_f=c_f)


# --- Loss ---

def elbo_weight(scheduler, t: torch.Tensor, use_elbo: bool) -> torch.Tensor:
    """C_t: 1 (L_simple, our choice: the paper writes a generic C_t), or the DDPM ELBO weight
    beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) with sigma_t^2 = beta_t, normalised to mean 1."""
    if not use_elbo:
        return torch.ones_like(t, dtype=torch.float32)
    betas, abar = scheduler.betas.to(t.device), scheduler.alphas_cumprod.to(t.device)
    w = betas / (2 * (1 - betas) * (1 - abar))
    return (w / w.mean())[t]


def plasticity(unet, models, x_t, t, cond, eps, c_t, e_ref=None, bound: float = 0.0):
    """A = mean C_t ||eps - eps_theta(x_t, c, t)||^2 over the batch (per-sample errors kept);
    cond None: an unconditional model's eps_theta(x_t, t)."""
    with common.autocast(models.device, models.dtype):
        e = (common.unet_output(unet, x_t, t, cond).float() - eps).pow(2).mean(dim=(1, 2, 3))
    if bound > 0 and e_ref is not None:
        # reconstructed bound: a sample already pushed past `bound` x the reference's loss stops pushing
        e = torch.where(e > bound * e_ref, e.detach(), e)
    return (c_t * e).mean()


def stability(params, anchor, precision) -> torch.Tensor:
    # B = sum_i (theta_i - mu*_i)^2 * precision_i / 2   (a sum over parameters; precision has mean 1)
    return sum(((p.float() - a) ** 2 * w).sum() for p, a, w in zip(params, anchor, precision)) / 2


def loss(unet, unet_ref, models: common.Models, batch, params, anchor, precision, gamma: float, bound: float):
    """The whole objective, as (total, terms):

        L = -(1 - gamma) A + gamma B
        A = mean C_t ||eps - eps_theta(x_t, c, t)||^2           (plasticity, ascended)
        B = sum_i (theta_i - mu*_i)^2 precision_i / 2            (stability)

    `batch` is (x_t, t, eps, c, C_t). terms also holds A_ref, the reference's A on the same batch
    (the yardstick of --ascent-bound and of the divergence stop).
    """
    x_t, t, eps, cond, c_t = batch
    with torch.no_grad(), common.autocast(models.device, models.dtype):  # the reference's errors
        e_ref = (common.unet_output(unet_ref, x_t, t, cond).float() - eps).pow(2).mean(dim=(1, 2, 3))
    a = plasticity(unet, models, x_t, t, cond, eps, c_t, e_ref, bound)
    b = stability(params, anchor, precision)
    # L = -(1 - gamma) A + gamma B
    total = -(1 - gamma) * a + gamma * b
    return total, {"A": a, "B": b, "A_ref": (c_t * e_ref).mean()}


# --- Training ---

def train(args: Args, models: common.Models, unet_ref, params, anchor, precision, data: dict) -> dict:
    """Gradient steps on L over random forget batches; stops (saving nothing) if A runs away."""
    unet = models.unet.train()
    opt = torch.optim.Adam(params, lr=args.lr)
    scaler = common.loss_scaler(args.mixed_precision, models.device)
    g = torch.Generator().manual_seed(args.seed)
    a_start, shown = None, {}
    bar = common.progress(args.steps, "VDU")
    for step in bar:
        idx = torch.randint(0, len(data["x0_f"]), (args.batch_size,), generator=g)
        # C_t = 0 below --t-min (T / (T - t_min) above it, mean 1): drawing t from [t_min, T) is the
        # same objective without spending batch slots on zero weights
        x_t, t, eps = common.add_noise(models.scheduler, data["x0_f"][idx], g, t_min=args.t_min)
        c_t = elbo_weight(models.scheduler, t, args.elbo_weights)
        c_f = None if data["c_f"] is None else data["c_f"][idx]
        total, terms = loss(unet, unet_ref, models, (x_t, t, eps, c_f, c_t), params, anchor, precision,
                            args.gamma, args.ascent_bound)
        common.check_finite(step, loss=total)
        shown = {k: v.item() for k, v in terms.items()}
        a_start = a_start or shown["A_ref"]
        if shown["A"] > args.divergence * shown["A_ref"]:
            raise common.UsageError(f"the forget loss A ran away ({shown['A']:.3g}, over {args.divergence:g}x the "
                                    f"reference's on the same batch) at step {step}; nothing was saved: "
                                    "raise --gamma, lower --lr or " + ("lower --ascent-bound." if args.ascent_bound
                                                                       else "bound the ascent (--ascent-bound 3)."))
        opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()  # fp16 loss scaling (a no-op otherwise)
        scaler.step(opt)
        scaler.update()
        common.show(bar, shown)
    return {"A_start": a_start, "A_end": shown.get("A"), "B_end": shown.get("B")}


# --- Save and report ---

def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.time()
    uncond = common.base_model_name(args.model) == "toy-uncond"
    out = args.output_dir or common.default_output_dir("vdu-uncond" if uncond else "vdu",
                                                       args.concept)
    with common.output_folder(out, args.overwrite) as folder:
        models, ps, unet_ref, params, anchor, precision = setup(args)
        data = make_data(args, models, ps)
        log = train(args, models, unet_ref, params, anchor, precision, data)
        metrics = evaluation.save_and_report(folder, models, ps, models.unet, unet_ref, args, started,
                                             args.n_eval_images, args.seed, method="VDU", **log)
    print(f"saved to {out}")
    return metrics


if __name__ == "__main__":
    common.cli(main)
