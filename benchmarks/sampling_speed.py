"""Time common.sample against diffusers' StableDiffusionPipeline on the toy model (reproduces the
sampler-speed figures in the README, "Tests and benchmarks").

    python benchmarks/sampling_speed.py [--batch 64] [--repeats 5]

Same prompts, seeds (one generator per image), steps and guidance scale for both; prints the
median seconds of each and the ratio diffusers / ours (>= 1.0 means ours is at least as fast).
The two are interleaved so that machine load affects both alike.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="images per call")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of each")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    device, dtype = common.seed_and_device(0, args.device)
    models = common.load_models("toy", device, dtype)
    pipe = StableDiffusionPipeline.from_pretrained(common.TOY_DIR / "pipeline", safety_checker=None).to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = [["a red circle", "a striped shape", "a box", "a dotted blue ring"][i % 4] for i in range(args.batch)]
    seeds = list(range(args.batch))
    steps, w = models.sample_steps, models.guidance_scale

    def ours():
        common.sample(models, prompts, seeds, batch_size=args.batch)

    def theirs():
        pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt",
             num_inference_steps=steps, guidance_scale=w)

    ours(), theirs()  # warm-up
    t_ours, t_theirs = [], []
    for _ in range(args.repeats):
        for fn, log in ((ours, t_ours), (theirs, t_theirs)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            log.append(time.perf_counter() - t0)
    a, b = statistics.median(t_ours), statistics.median(t_theirs)
    print(f"{args.batch} images, {steps} DDIM steps, guidance {w}, {device}, {torch.get_num_threads()} threads")
    print(f"common.sample:           {a:.3f} s (median of {args.repeats})")
    print(f"StableDiffusionPipeline: {b:.3f} s")
    print(f"ratio diffusers / ours:  {b / a:.2f}")


if __name__ == "__main__":
    main()
