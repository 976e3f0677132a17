"""How many UNet passes one training run costs at its Stable Diffusion defaults, counted, not
guessed: every UNet call on a tiny random SD-architecture pipeline is counted (images per call,
with or without gradient) while the method's own main() runs with its SD defaults, except the
length of its loop, run at two lengths so the count splits into a fixed part (its data, masks,
precision, warm-up) and a part per step; the budget in docs/lab/sd_benchmark.md extrapolates both
to the SD default length. The model's size does not change the count; a CFG call counts 2 images.

    python benchmarks/probes/unet_passes.py --pipeline <tiny SD folder> --methods pure esd
"""

import argparse
import contextlib
import importlib
import io
import json
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import eval as evaluation  # noqa: E402

# each method's loop flag, two short lengths to count at, and its SD default length. PURE's steps
# come in bursts of 4 forget and 1 repair step (whole bursts: 5 and 10); ESD's states stop at a
# random DDIM step, so its per-step figure is an average (expected: 51 no-grad passes a step)
LOOPS = {"pure": ("--steps", 5, 10, 100), "mim_mu": ("--epochs", 1, 2, 30), "vdu": ("--steps", 2, 4, 200),
         "esd": ("--steps", 100, 200, 1000), "salun": ("--steps", 2, 4, 40), "fmn": ("--steps", 2, 4, 35),
         "rl_critic": ("--iterations", 1, 2, 100)}


def count(method: str, pipeline: str, length: int, work: Path, extra: list[str]) -> dict:
    """UNet images passed without and with gradient in one run of `method` with its loop at `length`."""
    counts = {"no_grad": 0, "grad": 0}
    forward = UNet2DConditionModel.forward

    def counted(self, sample, *args, **kwargs):
        counts["grad" if torch.is_grad_enabled() else "no_grad"] += sample.shape[0]
        return forward(self, sample, *args, **kwargs)
    module = importlib.import_module(evaluation.METHODS[method]["script"].removesuffix(".py").replace("/", "."))
    flag = LOOPS[method][0]
    UNet2DConditionModel.forward = counted
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            module.main(["--model", pipeline, "--concept", "church", "--n-eval-images", "0", "--device", "cpu",
                         "--output-dir", str(work / method), "--overwrite", flag, str(length), *extra])
    finally:
        UNet2DConditionModel.forward = forward
    return counts


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, help="a tiny SD-architecture pipeline folder (tests/conftest.py "
                   "make_tiny_sd builds one)")
    p.add_argument("--methods", nargs="*", default=list(LOOPS), choices=list(LOOPS))
    p.add_argument("--clip-model", default=str(ROOT / "toy" / "clip"), help="CGRU's reward CLIP (any CLIP)")
    p.add_argument("--work", default=str(ROOT / "outputs" / "unet_passes"))
    p.add_argument("--lengths", nargs=2, type=int, help="two loop lengths instead of each method's own")
    args = p.parse_args()
    rows = {}
    for method in args.methods:
        flag, a, b, full = LOOPS[method]
        a, b = args.lengths or (a, b)
        extra = ["--clip-model", args.clip_model] if method == "rl_critic" else []
        ca, cb = (count(method, args.pipeline, n, Path(args.work), extra) for n in (a, b))
        per_step = {k: (cb[k] - ca[k]) / (b - a) for k in ca}
        fixed = {k: ca[k] - a * per_step[k] for k in ca}
        rows[method] = {"loop": flag, "sd_default": full, "fixed": fixed, "per_step": per_step,
                        "at_sd_default": {k: round(fixed[k] + full * per_step[k]) for k in ca}}
        print(f"{method}: {flag} {full}: {rows[method]['at_sd_default']['no_grad']} image-passes without "
              f"gradient, {rows[method]['at_sd_default']['grad']} with (fixed {fixed}, per step {per_step})", flush=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
