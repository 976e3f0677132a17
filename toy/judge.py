"""The toy world's judge: a small CNN with one head per attribute (shape, colour, texture).

It plays the role an ImageNet ResNet-50 plays for Imagenette in the unlearning literature:
eval.py asks it what a generated image shows. Each head has an extra "other" class for content
that no caption names (blobs, off-palette colours, gradient fills), so "not the concept" is a
real answer and not a forced choice among the named values.
Saved as config.json + model.safetensors (no pickle).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

HEADS = ("shape", "colour", "texture")


class Judge(nn.Module):
    def __init__(self, classes: dict[str, list[str]], width: int = 32):
        super().__init__()
        self.classes = classes

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        w = width
        self.features = nn.Sequential(block(3, w), nn.MaxPool2d(2),          # 32 -> 16
                                      block(w, 2 * w), nn.MaxPool2d(2),      # 16 -> 8
                                      block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({h: nn.Linear(4 * w, len(classes[h])) for h in HEADS})

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
        (folder / "config.json").write_text(json.dumps({"classes": self.classes}, indent=2))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(folder / "model.safetensors"))


def load_judge(folder: str | Path, device: str | torch.device = "cpu") -> Judge:
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    judge = Judge(config["classes"])
    state = load_file(str(folder / "model.safetensors"))
    judge.load_state_dict({k: v.float() for k, v in state.items()})
    return judge.to(device).eval().requires_grad_(False)
