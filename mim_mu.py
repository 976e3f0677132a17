"""MiM-MU: compensation-free unlearning by eliminating the mutual information of a concept.

Source: Cheng, Zhang, Huang, Wu, Huang, "Compensation-free Machine Unlearning in Text-to-Image
Diffusion Models by Eliminating the Mutual Information", arXiv 2603.00992. Public: the abstract
and summaries; the method section is not, so the loss below is reconstructed from what they
state (minimise the mutual information between the concept prompt and its images, by aligning
the unlearned model's predicted noise with the reference (pre-trained) model's; cross-attention only; ~30
epochs over a generated forgetting set; no retain data, no regulariser) plus the identity of
information-theoretic diffusion (Kong et al.): the information a prompt c adds about x_0 is an
integral over noise levels of E||eps(x_t, c) - eps(x_t, "")||^2. Driving it to zero for the
concept makes its conditional prediction equal an unconditional one: the prompt then means
"nothing in particular" (unlike ESD, no negative guidance: not "the opposite of the concept").
The derivation, what is reconstructed, and the evidence behind the defaults: docs/methods/mim_mu.md.

    python mim_mu.py --model toy --concept circle   # CPU, offline, about a minute
    python mim_mu.py --concept "Van Gogh"            # Stable Diffusion v1.4, GPU
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

import common
import eval as evaluation

# --- Arguments ---


@dataclass
class Args(common.RunArgs):
    epochs: int = common.arg(None, "passes over the forgetting set", ">=1")
    lr: float = common.arg(None, "Adam learning rate (no weight decay)", ">0")
    anchor_uncond: bool = common.arg(True, "also hold the empty prompt's prediction at the frozen "
                                           "unconditional target (reconstructed, see `loss`)")
    train: str = common.arg("xattn", "which UNet parameters train: cross-attention (the paper's) or LoRA "
                                     "adapters (--lora-rank, --lora-on)", choices=["xattn", "lora"])
    lora_rank: int = common.arg(4, "--train lora: the adapters' rank r", ">=1")
    lora_on: str = common.arg("xattn", "--train lora: the attention layers wrapped (xattn: cross, noxattn: "
                              "self, full: both)", choices=list(common.LORA_LAYERS))
    n_forget: int = common.arg(None, "images in the generated forgetting set", ">=1")
    batch_size: int = common.arg(None, "forget images per step", ">=1")
    retain_prompts: list[str] = common.arg([], "override the retain prompts used only by evaluation (or @file.txt)")
    forget_images: str = common.arg(None, "a folder of real forget images instead of generated ones")


# Where the toy and Stable Diffusion defaults differ. Evidence: docs/methods/mim_mu.md, "Defaults".
SD_DEFAULTS = dict(epochs=30, lr=1e-5, n_forget=100, batch_size=8)
TOY_DEFAULTS = dict(epochs=30, lr=3e-4, n_forget=64, batch_size=16)
# --train lora: LoRA's B starts at zero and few weights train, so a larger step than full weights
# (toy: chosen on seed 0, docs/lab/searches/mim_mu_lora.md; SD: the usual tenfold, not measured)
LORA_LR = dict(toy=1e-3, sd=1e-4)


def parse_args(argv: list[str] | None = None) -> Args:
    """The command line, with the toy or the SD column filled in and every number checked."""
    return common.parse_run_args(Args, argv, TOY_DEFAULTS, SD_DEFAULTS, LORA_LR)


# --- Setup ---

def setup(args: Args):
    """Seed and device, the models, the prompt sets, the frozen reference eps_ref, and theta:
    the cross-attention parameters only (attn2: to_q, to_k, to_v, to_out), as in the paper."""
    device, dtype = common.seed_and_device(args.seed, args.device, args.mixed_precision)
    models = common.load_models(args.model, device, dtype, args.sample_batch_size)
    ps = common.concept_prompts(args.concept, models, common.read_prompt_list(args.forget_prompts),
                                common.read_prompt_list(args.retain_prompts))
    unet_ref = common.reference(models.unet, args.train)  # eps_ref: the reference, frozen
    params = common.select_trainable(models.unet, args.train, lora_rank=args.lora_rank, lora_on=args.lora_on)  # theta
    if args.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
    return models, ps, unet_ref, params


# --- Data ---

def make_data(args: Args, models: common.Models, ps: common.PromptSet):
    """D_f: latents x_0 drawn by the reference model from the forget prompts (fixed seeds), or
    real images; plus a held-out forget batch with fixed t and eps for the MI proxy. No retain data."""
    x0_f, _, c_f = common.forget_set(models, ps, args.n_forget, args.seed, args.forget_images)
    held_prompts = ps.forget[-min(16, len(ps.forget)):]
    x0_h = common.sample(models, held_prompts, common.image_seeds(args.seed, "held_out", len(held_prompts)),
                         decode=False).latents.to(models.device)
    x_h, t_h, _ = common.add_noise(models.scheduler, x0_h, torch.Generator().manual_seed(args.seed + 1))
    return dict(x0_f=x0_f, c_f=c_f, held=(x_h, t_h, common.encode_prompts(models, held_prompts)))


# --- Loss ---

def loss(unet, unet_ref, models: common.Models, x_t, t, c_f, anchor_uncond: bool):
    """The whole objective, as (total, terms):

        L = L_mi [+ L_uncond]
        L_mi     = E || eps_theta(x_t, c_f, t) - sg(eps_ref(x_t, "", t)) ||^2
        L_uncond = E || eps_theta(x_t, "", t)  - sg(eps_ref(x_t, "", t)) ||^2   (--anchor-uncond)

    - The target is the FROZEN reference's unconditional prediction, not the trained model's
      own: otherwise the loss could also fall by dragging the shared unconditional branch (used
      by classifier-free guidance for every prompt) toward the concept.
    - x_t is a constant (no back-propagation through how it was generated): a plain regression,
      so a fixed forgetting set can be reused for many epochs.
    - reconstructed (L_uncond): the trained attn2 weights also serve the empty prompt, so
      regressing only the conditional branch moves eps_theta(x_t, "") too, and guidance then
      steers back to the concept. L_uncond holds the reference point of the mutual information
      fixed; it uses no retain data, so the method stays compensation-free.
    """
    empty = common.encode_prompts(models, [""] * len(x_t))
    with common.autocast(models.device, models.dtype):
        with torch.no_grad():
            target = unet_ref(x_t, t, encoder_hidden_states=empty).sample.float()  # sg(eps_ref(x_t, "", t))
        if anchor_uncond:  # one batched call for both branches
            eps_c, eps_u = unet(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                encoder_hidden_states=torch.cat([c_f, empty])).sample.float().chunk(2)
        else:
            eps_c = unet(x_t, t, encoder_hidden_states=c_f).sample.float()
    # L_mi = mean ||eps_theta(x_t, c_f, t) - eps_ref(x_t, "", t)||^2
    terms = {"L_mi": (eps_c - target).pow(2).mean()}
    if not anchor_uncond:
        return terms["L_mi"], terms
    # L_uncond = mean ||eps_theta(x_t, "", t) - eps_ref(x_t, "", t)||^2
    terms["L_uncond"] = (eps_u - target).pow(2).mean()
    return terms["L_mi"] + terms["L_uncond"], terms


# --- Training ---

def train(args: Args, models: common.Models, unet_ref, params, data: dict) -> dict:
    """`epochs` passes over D_f in shuffled batches, fresh t and eps every time. Returns the MI
    proxy (L_mi on the held-out forget batch) before and after."""
    unet = models.unet.train()
    opt = torch.optim.Adam(params, lr=args.lr, weight_decay=0.0)
    scaler = common.loss_scaler(args.mixed_precision, models.device)
    g = torch.Generator().manual_seed(args.seed)
    n = len(data["x0_f"])
    steps_per_epoch = max(1, n // args.batch_size)
    x_h, t_h, c_h = data["held"]
    mi_proxy = lambda: loss(unet, unet_ref, models, x_h, t_h, c_h, False)[0].item()  # noqa: E731
    with torch.no_grad():
        shown = {"MI_proxy": mi_proxy(), "L_mi": 0.0, "L_uncond": 0.0}
    start = shown["MI_proxy"]
    bar = common.progress(args.epochs * steps_per_epoch, "MiM-MU")
    for step in bar:
        if step % steps_per_epoch == 0:
            order = torch.randperm(n, generator=g)
        idx = order[(step % steps_per_epoch) * args.batch_size:][:args.batch_size]
        x_t, t, _ = common.add_noise(models.scheduler, data["x0_f"][idx], g)
        total, terms = loss(unet, unet_ref, models, x_t, t, data["c_f"][idx], args.anchor_uncond)
        common.check_finite(step, loss=total)
        opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()  # fp16 loss scaling (a no-op otherwise)
        scaler.step(opt)
        scaler.update()
        shown.update({k: v.item() for k, v in terms.items()})
        if (step + 1) % steps_per_epoch == 0:
            with torch.no_grad():
                shown["MI_proxy"] = mi_proxy()
        common.show(bar, shown)
    print(f"MI proxy (held-out forget batch): {start:.5f} -> {shown['MI_proxy']:.5f}")
    return {"mi_proxy_start": start, "mi_proxy_end": shown["MI_proxy"]}


# --- Save and report ---

def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.time()
    out = args.output_dir or common.default_output_dir("mim_mu", args.concept)
    with common.output_folder(out, args.overwrite) as folder:
        models, ps, unet_ref, params = setup(args)
        data = make_data(args, models, ps)
        mi = train(args, models, unet_ref, params, data)
        metrics = evaluation.save_and_report(folder, models, ps, models.unet, unet_ref, args, started,
                                             args.n_eval_images, args.seed, method="MiM-MU", **mi)
    print(f"saved to {out}")
    return metrics


if __name__ == "__main__":
    common.cli(main)
