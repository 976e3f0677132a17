"""Estimate each method's GPU memory on Stable Diffusion v1.4 without a GPU or the hub (reproduces
docs/lab/sd_memory.md).

    python benchmarks/sd_memory.py build [--out /tmp/sdmem/sd14]
    python benchmarks/sd_memory.py run pure --sample-steps 1 --json out.json -- \\
        --model /tmp/sdmem/sd14 --concept church --device cpu --n-eval-images 0 \\
        --output-dir /tmp/sdmem/out/pure --overwrite --train xattn --batch-size 1 --steps 1 ...
    python benchmarks/sd_memory.py probe --train full --n 4 [--mixed-precision bf16] [--gradient-checkpointing]

`build` writes, offline, a RANDOM-weight StableDiffusionPipeline folder with the exact SD v1.4
architecture (UNet 860M, CLIP ViT-L/14 text tower 123M, VAE 84M, SD's DDIM scheduler; a toy-derived
tokenizer stands in for CLIP's BPE vocabulary, padded to SD's 77 tokens) plus a random CLIP
ViT-B/32 (`<out>/clip-vit-base-patch32`, for rl_critic.py's --clip-model) and prints the parameter
counts next to SD v1.4's.

`run` runs one method's (or baseline's: esd, salun) own `main()` in this process, with its own
command line (after `--`), under a tracker of live tensor memory: the bytes of every tensor storage
alive at each moment, which is what `torch.cuda.max_memory_allocated` reports on a GPU (there,
without the caching allocator's rounding and fragmentation). It prints the peak, the live memory
when it happened, the peak inside each phase of the method (setup, data, training, sampling, ...)
and the process's max RSS (what run.json records as peak_memory_mb on a CPU). Two things are
patched, both only for the measurement:
  --sample-steps N   DDIM steps of common.sample (SD: 50; no CLI knob in pure/mim_mu/vdu). The
                     memory of one step does not depend on how many steps are taken (only
                     rl_critic's trajectories grow with them, and it has its own --sample-steps).
  --adam-foreach     torch.optim.Adam(foreach=True), what Adam uses by default on a CUDA device (on
                     the CPU it loops over parameters); its step allocates a temporary the size
                     of the trained parameters (the square root of exp_avg_sq).
Loading (random init, the safetensors state dict) is not counted: on a GPU it happens in host
memory; the loaded modules' parameters and buffers are. On the CPU, `.cpu()` is a no-op, so tensors
a GPU run keeps in host memory (rl_critic's stored trajectories, decoded images) are counted here.

`probe` runs one UNet training forward + backward on n noised latents (no optimiser, no reference
copy) and reports what it adds: for --train full, whose whole-method runs (UNet + reference +
gradients + Adam state: over 20 GiB before any activation) do not fit this machine's memory.

Results and how they extrapolate to SD's defaults: docs/lab/sd_memory.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as evaluation  # noqa: E402

GIB = 2 ** 30
# SD v1.4's published component sizes (parameters), to check the random build against
SD14_PARAMS = {"unet": 859.52e6, "text_encoder": 123.06e6, "vae": 83.65e6}


# ---------------------------------------------------------------------------------------------
# build: a random-weight pipeline with SD v1.4's exact architecture
# ---------------------------------------------------------------------------------------------

def build(out: Path) -> None:
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig,
                              CLIPTextModel)

    from toy.build import SCHEDULER, build_tokenizer

    torch.manual_seed(0)
    # The real CLIP BPE vocabulary cannot be downloaded: the toy tokenizer (a standard
    # CLIPTokenizer) stands in, padded to SD's 77 tokens. Memory depends on the sequence length
    # (77) and the embedding table (49408 rows), not on which ids the words get.
    tokenizer = build_tokenizer(out / "tokenizer-src")
    tokenizer.model_max_length = 77
    # CLIP ViT-L/14's text tower, as in SD v1.x
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=768, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2)
    scheduler = DDIMScheduler(**SCHEDULER)  # SD v1's noise schedule, as the toy uses
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    counts = {"unet": unet, "text_encoder": text_encoder, "vae": vae}
    print(f"SD v1.4 architecture, random weights -> {out}")
    for name, module in counts.items():
        n = sum(p.numel() for p in module.parameters())
        print(f"  {name:13s} {n / 1e6:8.2f}M parameters (SD v1.4: {SD14_PARAMS[name] / 1e6:.2f}M)")
        assert abs(n - SD14_PARAMS[name]) / SD14_PARAMS[name] < 0.01, f"{name} does not match SD v1.4"
    attn2 = sum(p.numel() for n, p in unet.named_parameters() if ".attn2." in n)
    print(f"  UNet cross-attention (attn2, what --train xattn trains): {attn2 / 1e6:.2f}M")
    del pipe, unet, vae, text_encoder

    # rl_critic.py's reward and critic CLIP (SD default openai/clip-vit-base-patch32):
    # CLIPConfig's defaults are ViT-B/32's configuration
    clip_dir = out / "clip-vit-base-patch32"
    clip = CLIPModel(CLIPConfig())
    clip.save_pretrained(clip_dir, safe_serialization=True)
    tokenizer.save_pretrained(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size=224).save_pretrained(clip_dir)
    print(f"  CLIP ViT-B/32 {sum(p.numel() for p in clip.parameters()) / 1e6:8.2f}M parameters "
          f"(openai/clip-vit-base-patch32: 151.28M) -> {clip_dir}")


# SDXL base 1.0's published component sizes (parameters)
SDXL_PARAMS = {"unet": 2567.46e6, "text_encoder": 123.06e6, "text_encoder_2": 694.66e6, "vae": 83.65e6}


def build_sdxl(out: Path) -> None:
    """A random-weight StableDiffusionXLPipeline with SDXL base 1.0's exact architecture: UNet
    2567M, CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers (123M, 695M), the VAE (84M)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from toy.build import SCHEDULER, build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer(out / "tokenizer-src")  # stands in for CLIP's BPE (see build)
    tokenizer.model_max_length = 77
    ids = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, hidden_act="quick_gelu", **ids))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        hidden_act="gelu", projection_dim=1280, **ids))
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=1024,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, scaling_factor=0.13025)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=DDIMScheduler(**SCHEDULER))
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")  # small shards: less host memory
    print(f"SDXL base 1.0 architecture, random weights -> {out}")
    for name, module in {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
                         "vae": vae}.items():
        n = sum(p.numel() for p in module.parameters())
        print(f"  {name:15s} {n / 1e6:8.2f}M parameters (SDXL: {SDXL_PARAMS[name] / 1e6:.2f}M)")
        assert abs(n - SDXL_PARAMS[name]) / SDXL_PARAMS[name] < 0.01, f"{name} does not match SDXL"


# ---------------------------------------------------------------------------------------------
# run: live tensor memory of one method run
# ---------------------------------------------------------------------------------------------

class LiveTensorMemory(TorchDispatchMode):
    """Counts the bytes of every tensor storage alive, and their peak.

    A storage is counted from the first time it is seen (the output or input of any operation,
    or a module registered with `register_module`) until it is freed (a weak-reference callback).
    Views share their base's storage and are counted once.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.peak_phase = ""
        self.storages: dict[int, weakref.ref] = {}  # storage data_ptr -> weakref (keeps callback alive)
        self.phases: list[str] = []                  # open phases, outermost first
        self.phase_stats: dict[str, list] = {}       # phase -> one {start, peak[, size]} per call
        self.paused = False                          # while loading from disk (host memory on a GPU)

    # --- counting ---
    def add(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key, nbytes = st.data_ptr(), st.nbytes()
        if nbytes == 0 or key in self.storages:
            return
        self.storages[key] = weakref.ref(st, functools.partial(self._freed, key, nbytes))
        self.live += nbytes
        if self.live > self.peak:
            self.peak, self.peak_phase = self.live, "/".join(self.phases)
        self._update_phases()

    def _freed(self, key: int, nbytes: int, _ref) -> None:
        if self.storages.get(key) is _ref:
            del self.storages[key]
            self.live -= nbytes

    def register_module(self, module) -> None:
        for t in list(module.parameters()) + list(module.buffers()):
            self.add(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        for t in tree_flatten((args, kwargs))[0] + tree_flatten(out)[0]:
            self.add(t)
        return out

    # --- phases: wrap a function so that each of its calls is a named phase ---
    def wrap(self, owner, name: str, label: str, size=None) -> None:
        """Record, for every call of owner.name, the live memory at entry and the peak inside;
        `size(args, kwargs)` optionally labels a call (e.g. how many prompts it samples)."""
        fn = getattr(owner, name, None)
        if fn is None:
            return

        @functools.wraps(fn)
        def phase(*a, **kw):
            call = {"start": self.live, "peak": self.live}
            if size:
                call["size"] = size(a, kw)
            self.phase_stats.setdefault(label, []).append(call)
            self.phases.append(label)
            try:
                return fn(*a, **kw)
            finally:
                self.phases.pop()
        setattr(owner, name, phase)

    def _update_phases(self) -> None:
        for name in self.phases:
            call = self.phase_stats[name][-1]
            call["peak"] = max(call["peak"], self.live)


PHASES = ["setup", "make_data", "precision_and_anchor", "saliency_mask", "train", "rollouts", "rewards",
          "state_features", "fit_critic", "policy_update"]
# the module behind each method name `run` accepts: every script of the comparison (eval.METHODS)
MODULES = {name: m["script"].removesuffix(".py").replace("/", ".") for name, m in evaluation.METHODS.items()}


def run(method: str, argv: list[str], sample_steps: int | None, adam_foreach: bool, json_path: str | None):
    import importlib

    import common

    mod = importlib.import_module(MODULES[method])
    tracker = LiveTensorMemory()

    # Loading happens in host memory on a GPU (random init, then the safetensors state dict, then
    # .to(device)): not counted. What it leaves, the modules' parameters and buffers, is.
    load_models, load_clip = common.load_models, evaluation.load_clip

    def untracked(fn, *a, **kw):
        tracker.paused = True
        try:
            return fn(*a, **kw)
        finally:
            tracker.paused = False

    def load_models_tracked(*a, **kw):
        models = untracked(load_models, *a, **kw)
        for m in (models.text_encoder, models.text_encoder_2, models.vae, models.unet):
            if m is not None:
                tracker.register_module(m)
        if sample_steps:
            models.sample_steps = sample_steps  # SD: 50; the memory of one step is the same
        return models

    def load_clip_tracked(*a, **kw):
        clip = untracked(load_clip, *a, **kw)
        tracker.register_module(clip.model)
        return clip

    common.load_models = load_models_tracked
    evaluation.load_clip = load_clip_tracked
    if adam_foreach:
        torch.optim.Adam = functools.partial(torch.optim.Adam, foreach=True)
    for name in PHASES:
        tracker.wrap(mod, name, name)
    tracker.wrap(common, "sample", "common.sample", size=lambda a, kw: len(a[1]))  # prompts
    tracker.wrap(common, "decode_latents", "common.decode_latents")
    tracker.wrap(evaluation, "save_and_report", "save_and_report")

    sys.argv = [f"{method}.py", *argv]
    started = time.time()
    with tracker:
        mod.main()
    result = {
        "method": method, "argv": argv, "sample_steps_patch": sample_steps, "adam_foreach": adam_foreach,
        "peak_tensor_gib": round(tracker.peak / GIB, 3), "peak_phase": tracker.peak_phase,
        "max_rss_gib": round(common.peak_memory_mb(torch.device("cpu")) / 1024, 3),
        "wall_s": round(time.time() - started, 1),
        # per phase: its calls' (live memory at entry, peak inside[, size]) in GiB, at most 6 shown
        "phases": {k: [{**c, "start": round(c["start"] / GIB, 3), "peak": round(c["peak"] / GIB, 3)}
                       for c in calls[:3] + calls[3:][-3:]] for k, calls in tracker.phase_stats.items()},
    }
    _report(result, json_path)


def probe(model: str, train: str, n: int, mixed_precision: str, checkpointing: bool, json_path: str | None):
    """One UNet training forward + backward on n noised SD latents (no optimiser, no reference
    copy): what a method's step adds to the memory it already holds, for a --train choice that
    is too large to run a whole method with here. Returns (and prints) the live memory before,
    the peak during, and what is left after (the gradients)."""
    import common

    tracker = LiveTensorMemory()
    device, dtype = common.seed_and_device(0, "cpu", mixed_precision)
    tracker.paused = True
    models = common.load_models(model, device, dtype)
    tracker.paused = False
    params = common.select_trainable(models.unet, train, lora_rank=4, lora_on="full")
    if checkpointing:
        models.unet.enable_gradient_checkpointing()
    models.unet.train()
    prompts = common.cycle(common.sd_prompt_set("church").forget, n)
    g = torch.Generator().manual_seed(0)
    started = time.time()
    with tracker:
        for m in (models.text_encoder, models.text_encoder_2, models.vae, models.unet):
            if m is not None:
                tracker.register_module(m)
        c = common.encode_prompts(models, prompts)
        size = models.unet.config.sample_size  # 64 latent pixels at SD v1.4, 128 at SDXL
        x0 = torch.randn((n, 4, size, size), generator=g)
        x_t, t, eps = common.add_noise(models.scheduler, x0, g)
        before = tracker.live
        tracker.peak = tracker.live
        with common.autocast(device, dtype):
            pred = models.unet(x_t, t, encoder_hidden_states=c).sample.float()
        after_forward = tracker.live
        loss = (pred - eps).pow(2).mean()
        loss.backward()
        del pred, loss
    result = {"probe": "unet forward+backward", "train": train, "n": n, "mixed_precision": mixed_precision,
              "gradient_checkpointing": checkpointing,
              "trained_params_gib": round(sum(p.numel() * p.element_size() for p in params) / GIB, 3),
              "live_before_gib": round(before / GIB, 3),
              "saved_by_forward_gib": round((after_forward - before) / GIB, 3),
              "peak_above_before_gib": round((tracker.peak - before) / GIB, 3),
              "left_after_gib": round((tracker.live - before) / GIB, 3),
              "max_rss_gib": round(common.peak_memory_mb(torch.device("cpu")) / 1024, 3),
              "wall_s": round(time.time() - started, 1)}
    _report(result, json_path)


def _report(result: dict, json_path: str | None) -> None:
    print(json.dumps(result, indent=1))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the random SD v1.4-architecture pipeline and CLIP ViT-B/32")
    b.add_argument("--out", default=None, help="folder to write (default: /tmp/sdmem/sd14 or /tmp/sdmem/sdxl)")
    b.add_argument("--arch", default="sd14", choices=["sd14", "sdxl"], help="SD v1.4's or SDXL base 1.0's")
    r = sub.add_parser("run", help="run a method's main() under the live tensor memory tracker")
    r.add_argument("method", choices=list(MODULES))
    r.add_argument("--sample-steps", type=int, default=None,
                   help="DDIM steps of common.sample (default: the model's, 50 on SD)")
    r.add_argument("--adam-foreach", action=argparse.BooleanOptionalAction, default=True,
                   help="Adam(foreach=True), as on a CUDA device (default: %(default)s)")
    r.add_argument("--json", default=None, help="also write the result here")
    q = sub.add_parser("probe", help="one UNet training forward+backward (no optimiser, no reference)")
    q.add_argument("--model", default="/tmp/sdmem/sd14", help="the built folder (default: %(default)s)")
    q.add_argument("--train", default="full", choices=["full", "xattn", "noxattn", "lora"],
                   help="what trains (lora: rank 4 on every attention projection)")
    q.add_argument("--n", type=int, default=1, help="samples in the UNet batch")
    q.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    q.add_argument("--gradient-checkpointing", action="store_true")
    q.add_argument("--json", default=None, help="also write the result here")
    # everything after `--` is the method's own command line
    argv = sys.argv[1:]
    ours, theirs = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    a = p.parse_args(ours)
    if a.command == "build":
        (build_sdxl if a.arch == "sdxl" else build)(Path(a.out or f"/tmp/sdmem/{a.arch}"))
    elif a.command == "probe":
        probe(a.model, a.train, a.n, a.mixed_precision, a.gradient_checkpointing, a.json)
    else:
        run(a.method, theirs, a.sample_steps, a.adam_foreach, a.json)


if __name__ == "__main__":
    main()
