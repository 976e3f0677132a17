"""Prove the GPU path and measure it, in one short run, for a session that is lent a GPU.

    python benchmarks/gpu_check.py --json gpu.json        # on a GPU: build, then replay every record
    python benchmarks/gpu_check.py --records sdxl-pure sdxl-esd --json gpu.json   # some of them

Each record of benchmarks/records/sd_memory/ (16gb-*, 24gb-*, sdxl-*) is a method's command line
whose memory was measured on a CPU (docs/lab/sd_memory.md). Here the same command line runs on the
device, with its model folder replaced by one built here (random weights of SD v1.4's or SDXL base
1.0's exact architecture, `sd_memory.py build`, skipped when the folder exists) and fp16 where the
README's recipe says fp16 (the CPU measured bf16 in its place). Each record runs in its own
process. Per record: peak memory allocated and reserved on the device (GiB) beside the CPU
estimate, the seconds of the training phase and per unit of training (steps, iterations or
epochs), the wall time, and the device, torch and CUDA versions; all in one JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECORDS = ROOT / "benchmarks" / "records" / "sd_memory"
BUILT = {"sd14": "/tmp/sdmem/sd14", "sdxl": "/tmp/sdmem/sdxl"}  # the folders the records name
GIB = 2 ** 30


def command_line(record: dict, name: str, folders: dict, device: str, out: Path) -> list[str]:
    """The record's method command line, pointed at `folders`, `device` and `out`."""
    argv = []
    for a in record["argv"]:
        for arch, built in BUILT.items():
            a = a.replace(built, str(folders[arch]))
        argv.append(a)
    argv = [a for a in argv if a != "--overwrite"]
    flag = lambda key, value: argv.__setitem__(argv.index(key) + 1, value)  # noqa: E731
    flag("--device", device)
    flag("--output-dir", str(out))
    if name.startswith("16gb") and "--mixed-precision" in argv:
        flag("--mixed-precision", "fp16")  # the README's 16 GB recipe; the CPU could only measure bf16
    return [*argv, "--overwrite"]


def replay_one(name: str, argv: list[str]) -> dict:
    """Run one method in this process and measure it: device memory, training time, wall time."""
    import importlib

    from benchmarks.sd_memory import MODULES
    record = json.loads((RECORDS / f"{name}.json").read_text())
    mod = importlib.import_module(MODULES[record["method"]])
    phase = {}
    train = mod.train

    def timed_train(*a, **kw):
        started = time.time()
        try:
            return train(*a, **kw)
        finally:
            phase["train_s"] = time.time() - started
    mod.train = timed_train
    cuda = torch.cuda.is_available() and "cuda" in argv
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    mod.main(argv)
    args = mod.parse_args(argv)
    units = next((getattr(args, k) for k in ("steps", "iterations", "epochs") if getattr(args, k, None)), 1)
    return {"record": name, "method": record["method"], "argv": argv,
            "cpu_estimate_gib": record["peak_tensor_gib"],
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3) if cuda else None,
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3) if cuda else None,
            "train_s": round(phase.get("train_s", float("nan")), 2), "train_units": units,
            "train_s_per_unit": round(phase.get("train_s", float("nan")) / units, 3),
            "wall_s": round(time.time() - started, 1)}


def environment() -> dict:
    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
            "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / GIB, 1) if cuda else None}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", nargs="*", default=None, help="record names (default: every one with a command "
                                                              "line: 16gb-*, 24gb-*, sdxl-*)")
    p.add_argument("--sd14", default=BUILT["sd14"], help="the SD v1.4-architecture folder (built if missing)")
    p.add_argument("--sdxl", default=BUILT["sdxl"], help="the SDXL-architecture folder (built if missing)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", default="/tmp/gpu_check", help="where the runs save (deleted runs are not kept)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one record in this process
    a, rest = p.parse_known_args()
    if a.one:
        print("RESULT " + json.dumps(replay_one(a.one, rest)), flush=True)
        return
    from benchmarks import sd_memory
    names = a.records or sorted(f.stem for f in RECORDS.glob("*.json") if "argv" in json.loads(f.read_text()))
    folders = {"sd14": Path(a.sd14), "sdxl": Path(a.sdxl)}
    for arch, build in (("sd14", sd_memory.build), ("sdxl", sd_memory.build_sdxl)):
        if any(n.startswith("sdxl") == (arch == "sdxl") for n in names) and not (folders[arch] / "model_index.json").exists():
            build(folders[arch])
    results = {"environment": environment(), "runs": []}
    for name in names:
        record = json.loads((RECORDS / f"{name}.json").read_text())
        argv = command_line(record, name, folders, a.device, Path(a.out) / name)
        r = subprocess.run([sys.executable, __file__, "--one", name, *argv], cwd=ROOT, capture_output=True, text=True)
        lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
        run = json.loads(lines[-1][7:]) if lines else {"record": name, "failed": r.stderr.strip().splitlines()[-1:]}
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
        if a.json:  # after every run: a run cut short by a time limit keeps what was measured
            Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
