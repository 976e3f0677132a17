"""The toy world's judges: small CNNs with one head per attribute (shape, colour, texture).

A judge plays the role an ImageNet ResNet-50 plays for Imagenette in the unlearning literature:
eval.py asks it what a generated image shows. Each head has an extra "other" class for content
that no caption names (blobs, off-palette colours, gradient fills, and degenerate images: a blank
canvas, a full-frame fill, noise), so "not the concept" is a real answer and not a forced choice
among the named values.

Two judges are built the same way: `judge/` (arch "resnet"), whose answers every toy metric
reports, and `judge2/` (arch "cnn", another architecture and seed), used only to cross-check
it: eval reports the share of images on which the two agree. Both are trained so that the shape
and texture heads answer for the form whatever the colour (pale, faded, desaturated, hue-shifted,
blurred, noisy), and the colour head for the colour.
Saved as config.json + model.safetensors (float16, no pickle); they load as float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

HEADS = ("shape", "colour", "texture")


def _cnn(w: int) -> nn.Sequential:
    """Three double-conv blocks with GroupNorm, max-pooling between them, global average pool."""
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                             nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())
    return nn.Sequential(block(3, w), nn.MaxPool2d(2),          # 32 -> 16
                         block(w, 2 * w), nn.MaxPool2d(2),      # 16 -> 8
                         block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class _Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout))
        self.skip = nn.Conv2d(cin, cout, 1, stride) if (cin != cout or stride != 1) else nn.Identity()

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


class _AvgMax(nn.Module):
    def forward(self, x):  # (n, c, h, w) -> (n, 2c): average and max pooling side by side
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


def _resnet(w: int) -> nn.Sequential:
    """A 5x5 stem, strided residual blocks with BatchNorm and ReLU, average + max pooling."""
    return nn.Sequential(nn.Conv2d(3, w // 2, 5, padding=2), nn.BatchNorm2d(w // 2), nn.ReLU(),
                         _Residual(w // 2, w, 2), _Residual(w, w, 1),           # 32 -> 16
                         _Residual(w, 2 * w, 2), _Residual(2 * w, 2 * w, 1),    # 16 -> 8
                         _AvgMax())


ARCHS = {"cnn": (_cnn, lambda w: 4 * w), "resnet": (_resnet, lambda w: 4 * w)}


class Judge(nn.Module):
    def __init__(self, classes: dict[str, list[str]], width: int = 32, arch: str = "cnn"):
        super().__init__()
        self.classes, self.width, self.arch = classes, width, arch
        make, features = ARCHS[arch]
        self.features = make(width)
        self.heads = nn.ModuleDict({h: nn.Linear(features(width), len(classes[h])) for h in HEADS})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (n, 3, 32, 32) in [-1, 1] -> {head: logits (n, classes)}."""
        h = self.features(images)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """{head: predicted class index (n,)}, in batches, on the judge's device."""
        device = next(self.parameters()).device
        out = {h: [] for h in HEADS}
        for i in range(0, len(images), batch_size):
            logits = self(images[i:i + batch_size].to(device, torch.float32))
            for h in HEADS:
                out[h].append(logits[h].argmax(-1).cpu())
        return {h: torch.cat(v) for h, v in out.items()}

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"classes": self.classes, "width": self.width, "arch": self.arch}
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous()
                   for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))


def load_judge(folder: str | Path, device: str | torch.device = "cpu") -> Judge:
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    judge = Judge(config["classes"], config.get("width", 32), config.get("arch", "cnn"))
    state = load_file(str(folder / "model.safetensors"))
    judge.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return judge.to(device).eval().requires_grad_(False)
