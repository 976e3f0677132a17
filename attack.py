"""The embedding attack: does an erased concept come back when asked the right way?

A method can erase the *word* and keep the *concept*: synonym UA probes this weakly. The strong
probe is textual inversion against the unlearned model (Pham, Marshall, Cohen, Hegde,
"Circumventing Concept Erasure Methods for Text-to-Image Generative Models", ICLR 2024): add one
new token <v*> to the vocabulary and learn its input embedding v, everything else frozen, so that
the unlearned UNet denoises the base model's images of the concept well when conditioned on
"a <v*>". Then sample "a <v*>" from the unlearned model and count how many images the judge calls
the concept: the attack success rate (ASR).

    v* = argmin_v  E_{x_0 in D_f, t, eps} || eps - eps_unlearned(x_t, t, c(v)) ||^2

Two controls make the number mean something: the same attack (same budget, same seeds) against
the BASE model must recover the concept (`asr_base`; if it does not, a low ASR says nothing about
the method), and `attack.png` shows the learned prompt's images from the base and the unlearned
model side by side. The budget (steps, lr, images) is fixed and printed, the same for every method.

    python attack.py --run outputs/pure-circle        # toy: CPU, well under a minute
    python attack.py --run outputs/esd-van-gogh       # Stable Diffusion: GPU

Writes attack.json and attack.png into the run folder; the saved UNet is only read.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import common
import eval as evaluation

# --- Arguments ---


@dataclass
class Args:
    run: str = common.arg("", "a saved run folder (unet/ and run.json), e.g. outputs/pure-circle")
    steps: int = common.arg(None, "optimiser steps on the embedding, per attack", ">=1")
    lr: float = common.arg(None, "Adam learning rate of the embedding", ">0")
    batch_size: int = common.arg(None, "images per step", ">=1")
    n_images: int = common.arg(None, "the base model's images of the concept the attack learns from", ">=1")
    n_eval_images: int = common.arg(None, "images sampled with the learned prompt to judge each ASR", ">=1")
    init_word: str = common.arg(None, "the unrelated word v starts from (never the concept or its synonym)")
    seed: int = common.arg(0, "seed of the attack's data, training and sampling", ">=0")
    mixed_precision: str = common.arg("no", "autocast dtype", choices=["no", "fp16", "bf16"])
    gradient_checkpointing: bool = common.arg(False, "trade compute for memory in the UNet")
    device: str = common.arg("auto", "auto, cpu or cuda", choices=["auto", "cpu", "cuda"])
    sample_batch_size: int = common.arg(None, "prompts per sampling batch (default: 64 toy, 8 SD)", ">=1")
    overwrite: bool = common.arg(False, "replace an existing attack.json / attack.png")


# The budget. Toy: chosen so that the attack recovers every shape and texture from the base model
# (docs/methods/attack.md). SD: the textual-inversion recipe scaled down; untested on SD (no GPU run yet).
TOY_DEFAULTS = dict(steps=150, lr=1e-2, batch_size=16, n_images=64, n_eval_images=64, init_word="shape")
SD_DEFAULTS = dict(steps=1000, lr=5e-3, batch_size=1, n_images=20, n_eval_images=20, init_word="object")
PLACEHOLDER = "<v*>"
# The prompt the placeholder sits in, by the concept's kind.
TEMPLATES = {"toy": "a <v*>", "object": "a photo of <v*>", "style": "a painting in the style of <v*>",
             "nudity": "a photo of <v*>"}


def parse_args(argv: list[str] | None = None) -> tuple[Args, dict]:
    """The command line and the run's run.json, with the toy or the SD column filled in."""
    args = common.parse_args(Args, argv)
    folder = Path(args.run)
    if not args.run or not common.saved_run(args.run):
        raise common.UsageError(f"--run {args.run!r} is not a saved run: give a folder with run.json and unet/ "
                                "or LoRA weights (what pure.py, esd.py ... write, e.g. outputs/pure-circle).")
    run = json.loads((folder / "run.json").read_text())
    common.fill_defaults(args, TOY_DEFAULTS if run["base_model"] == "toy" else SD_DEFAULTS)
    common.check_ranges(args)
    if not args.overwrite and any((folder / f).exists() for f in ("attack.json", "attack.png")):
        raise common.UsageError(f"{folder} already holds an attack (attack.json); pass --overwrite to redo it.")
    return args, run


# --- Setup ---

class Placeholder:
    """The new token <v*> and its input embedding v, the attack's only trainable tensor.

    The tokenizer learns the token and the text encoder's embedding table gets a row for it; a
    forward hook on that table writes v into every position holding the token, so gradients reach
    v and nothing else (the text encoder, UNet and VAE stay frozen)."""

    def __init__(self, models: common.Models, init_word: str):
        self.models = models
        tok, encoder = models.tokenizer, models.text_encoder
        if PLACEHOLDER not in tok.get_vocab():
            tok.add_tokens(PLACEHOLDER)
            encoder.resize_token_embeddings(len(tok))
        self.token_id = tok.convert_tokens_to_ids(PLACEHOLDER)
        ids = tok(init_word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise common.UsageError(f"--init-word {init_word!r} is {len(ids)} tokens for this tokenizer; "
                                    "choose a word that is one token.")
        self.table = encoder.get_input_embeddings()
        self.init_id = ids[0]
        self.v = torch.nn.Parameter(self.table.weight[ids[0]].detach().float().clone())  # (dim,)
        self._hook = self.table.register_forward_hook(self._substitute)

    def _substitute(self, module, inputs, output):
        # output (n, tokens, dim): the table's rows; the placeholder's positions take v instead
        at = (inputs[0] == self.token_id).unsqueeze(-1)
        return torch.where(at, self.v.to(output.dtype), output)

    def remove(self) -> None:
        """Take the hook off the embedding table (the token stays; a new Placeholder re-hooks it)."""
        self._hook.remove()

    def text_states(self, prompts: list[str]) -> torch.Tensor:
        """c(v): the text encoder's states of `prompts`, differentiable in v (no cache)."""
        return common.text_states(self.models, prompts)  # (n, tokens, dim)

    def nearest_words(self, k: int = 5) -> list[tuple[str, float]]:
        """The k vocabulary tokens whose input embeddings are closest in cosine to v."""
        table = self.table.weight.detach().float()
        sims = F.cosine_similarity(table, self.v.detach()[None], dim=-1)
        special = set(self.models.tokenizer.all_special_ids) | {self.token_id}
        order = [i for i in sims.argsort(descending=True).tolist() if i not in special][:k]
        words = self.models.tokenizer.convert_ids_to_tokens(order)
        return [(w.replace("</w>", ""), round(float(sims[i]), 3)) for w, i in zip(words, order)]


def setup(args: Args, run: dict):
    """Seed and device, the base models (`models.unet` is the base UNet), the prompt set of the
    run's concept, and the run's unlearned UNet, frozen and only read."""
    device, dtype = common.seed_and_device(args.seed, args.device, args.mixed_precision)
    # the original base model (a chained run's run.json names it, not the run it continued)
    models = common.load_models(run["base_model"], device, dtype, args.sample_batch_size)
    if models.is_sdxl:
        raise common.UsageError("the attack learns a token's embedding in one text encoder and SDXL has two, "
                                "which it does not handle yet.")
    ps = common.concept_prompts(run["args"]["concept"], models, common.read_prompt_list(run["args"].get("forget_prompts")))
    common.one_concept(ps, "The attack", "it learns one concept's token")
    unet = common.load_run_unet(args.run, device).requires_grad_(False)
    models.unet.eval().requires_grad_(False)
    check_init_word(args.init_word, ps)
    return models, ps, unet


def check_init_word(word: str, ps: common.PromptSet) -> None:
    """The attack starts from an unrelated word: never the concept, a word of it, or a word of its
    synonym (one the synonym prompts use and the forget prompts do not)."""
    def words(prompts):
        return {w for p in prompts for w in p.lower().split()}
    banned = set(ps.concept.lower().split()) | (words(ps.synonym) - words(ps.forget))
    if word.lower() in banned:
        raise common.UsageError(f"--init-word {word!r} names the concept {ps.concept!r}; the attack must start "
                                "from an unrelated word (e.g. 'shape' on the toy, 'object' on SD).")


def template(models: common.Models, ps: common.PromptSet) -> str:
    return TEMPLATES["toy" if models.is_toy else ps.kind]


# --- Data ---

def make_data(args: Args, models: common.Models, ps: common.PromptSet) -> torch.Tensor:
    """D_f: the base model's images (latents x_0) of the concept from its forget prompts, the same
    set a method drawn with this seed learned to forget."""
    x0, _, _ = common.forget_set(models, ps, args.n_images, args.seed)
    return x0  # (n_images, 4, h, w)


# --- Loss ---

def loss(unet, placeholder: Placeholder, models: common.Models, batch, prompt: str):
    """Textual inversion's objective for one batch (x_t, t, eps), as (total, terms):

        L(v) = mean || eps - eps_unet(x_t, t, c(v)) ||^2,   c(v) = text states of "a <v*>"
    """
    x_t, t, eps = batch
    c = placeholder.text_states([prompt] * len(x_t))
    with common.autocast(models.device, models.dtype):
        eps_pred = unet(x_t, t, encoder_hidden_states=c).sample
    l_ti = (eps_pred.float() - eps.float()).pow(2).mean()
    return l_ti, {"L_TI": l_ti}


# --- Training ---

def learn_embedding(args: Args, models: common.Models, unet, x0: torch.Tensor, prompt: str, desc: str):
    """Learn v against `unet` from the init word, `steps` Adam steps; returns (Placeholder, final loss).
    The random stream depends only on the seed: the base and the unlearned model are attacked with
    the same batches, timesteps and noise."""
    placeholder = Placeholder(models, args.init_word)
    opt = torch.optim.Adam([placeholder.v], lr=args.lr)
    scaler = common.loss_scaler(args.mixed_precision, models.device)
    g = torch.Generator().manual_seed(args.seed)
    if args.gradient_checkpointing:
        # diffusers checkpoints only in training mode; SD's UNet has no dropout or batch norm, so
        # the mode changes nothing else
        unet.enable_gradient_checkpointing()
    unet.train(args.gradient_checkpointing)
    bar = common.progress(args.steps, desc)
    for step in bar:
        idx = torch.randint(0, len(x0), (args.batch_size,), generator=g)
        x_t, t, eps = common.add_noise(models.scheduler, x0[idx], g)
        total, terms = loss(unet, placeholder, models, (x_t, t, eps), prompt)
        common.check_finite(step, loss=total)
        opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(opt)
        scaler.update()
        common.show(bar, {k: v.detach() for k, v in terms.items()})
    unet.eval()
    return placeholder, total.item()


def success_rate(models: common.Models, unet, judge, ps: common.PromptSet, prompts: list[str],
                 seeds: list[int], text_states: torch.Tensor | None = None):
    """ASR: the share of images from `prompts` (or their given text states) that the judge
    classifies as the concept. Returns (share, images)."""
    images = common.sample(models, prompts, seeds, unet=unet, text_states=text_states).images
    answers = judge(images, ps.kind, evaluation.style_candidates(ps))
    return sum(a.lower() == ps.concept.lower() for a in answers) / len(answers), images


def attack(args: Args, models: common.Models, unet, judge, ps: common.PromptSet, x0: torch.Tensor,
           seeds: list[int], desc: str) -> dict:
    """One attack against `unet`: learn v, then judge "a <v*>" sampled from `unet` with `seeds`."""
    prompt = template(models, ps)
    placeholder, final_loss = learn_embedding(args, models, unet, x0, prompt, desc)
    with torch.no_grad():
        states = placeholder.text_states([prompt] * len(seeds))
    placeholder.remove()
    asr, images = success_rate(models, unet, judge, ps, [prompt] * len(seeds), seeds, states)
    return {"asr": asr, "images": images, "text_states": states, "final_loss": final_loss,
            "nearest_words": placeholder.nearest_words()}


# --- Save and report ---

def eval_seeds(seed: int, n: int) -> list[int]:
    """The seeds of the learned prompt's judged images: their own block (eval.EVAL_SEED_OFFSET),
    disjoint from the training sets' and the evaluation's."""
    return evaluation.eval_seeds(seed, "attack", n)


def main(argv: list[str] | None = None) -> dict:
    args, run = parse_args(argv)
    started = time.time()
    folder = Path(args.run)
    models, ps, unet = setup(args, run)
    prompt = template(models, ps)
    budget = dict(steps=args.steps, lr=args.lr, batch_size=args.batch_size, n_images=args.n_images,
                  init_word=args.init_word, prompt=prompt, seed=args.seed)
    print("attack budget: " + ", ".join(f"{k} {v}" for k, v in budget.items()))
    x0 = make_data(args, models, ps)
    judge = evaluation.Judge(models, evaluation.load_clip(models) if ps.kind == "style" else None)
    seeds = eval_seeds(args.seed, args.n_eval_images)
    on_run = attack(args, models, unet, judge, ps, x0, seeds, "attack (unlearned)")
    on_base = attack(args, models, models.unet, judge, ps, x0, seeds, "attack (base)")
    # the learned prompt of the unlearned model's attack, drawn by the base model; and the plain
    # concept prompt drawn by the unlearned model (what the attack improves on)
    transfer, base_images = success_rate(models, models.unet, judge, ps, [prompt] * len(seeds), seeds,
                                         on_run["text_states"])
    plain_prompt = ps.forget[0]
    plain, plain_images = success_rate(models, unet, judge, ps, [plain_prompt] * len(seeds), seeds)
    result = {
        "run": str(folder), "method": run.get("method"), "concept": ps.concept, "kind": ps.kind,
        "asr": on_run["asr"], "asr_base": on_base["asr"],
        "asr_learned_prompt_on_base": transfer, "concept_rate_plain_prompt": plain,
        "plain_prompt": plain_prompt, "budget": budget, "n_eval_images": len(seeds),
        "eval_seeds": [seeds[0], seeds[-1]], "final_loss": on_run["final_loss"],
        "final_loss_base": on_base["final_loss"], "nearest_words": on_run["nearest_words"],
        "nearest_words_base": on_base["nearest_words"], "wall_time_s": round(time.time() - started, 1),
    }
    k = min(8, len(seeds))
    grid = torch.stack([plain_images[:k], on_run["images"][:k], base_images[:k]])
    labels = [f"unlearned: {plain_prompt}", f"unlearned: {prompt} (learned)", f"base: {prompt} (same v)"]
    tmp_png, tmp_json = folder / ".attack.tmp.png", folder / ".attack.tmp.json"
    common.image_grid(grid, tmp_png, labels)
    tmp_json.write_text(json.dumps(result, indent=1))
    tmp_png.replace(folder / "attack.png")
    tmp_json.replace(folder / "attack.json")
    print(f"ASR {100 * result['asr']:.0f}% on the unlearned model ({len(seeds)} images), "
          f"{100 * result['asr_base']:.0f}% on the base model (the same attack); the concept prompt "
          f"{plain_prompt!r}: {100 * plain:.0f}%. Nearest words to v: "
          + ", ".join(w for w, _ in result["nearest_words"]))
    print(f"wrote {folder / 'attack.json'} and attack.png ({result['wall_time_s']:.0f}s)")
    return result


if __name__ == "__main__":
    common.cli(main)
