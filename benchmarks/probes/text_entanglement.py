"""How alike does the toy's frozen text encoder make a concept's prompt and its neighbours'?

MiM-MU trains only cross-attention, so its loss can reach another prompt only through the text
encoder's token states for it, which the UNet's to_k and to_v project. A retain prompt whose states
are close to the forget prompt's moves with it. This prints, for the concept's prompt ("a circle")
and each other value of its kind ("a square", ...), the cosine between their text-encoder outputs:
over all token states, and at the concept word's own position (the first token where they differ).
The empty prompt is listed for reference: it is what MiM-MU maps the concept to.

    python benchmarks/probes/text_entanglement.py --concept circle
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import common  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concept", default="circle", help="toy concept")
    a = p.parse_args()
    models = common.load_models("toy", torch.device("cpu"))
    ps = common.toy_prompt_set(a.concept, models.toy)
    prompts = [ps.forget[0]] + [prompt for prompt, _ in ps.retain_in] + [""]
    states = common.encode_prompts(models, prompts)
    ids = models.tokenizer(prompts, padding="max_length", max_length=states.shape[1], truncation=True).input_ids
    word = next(i for i in range(len(ids[0])) if ids[0][i] != ids[1][i])  # the concept word's position
    print(f"\nToy text encoder: cosine of '{prompts[0]}' to each prompt (token position {word} is the "
          f"concept word)\n\n| prompt | all {states.shape[1]} token states | concept word's position |\n|---|---|---|")
    for prompt, s in zip(prompts[1:], states[1:]):
        whole = F.cosine_similarity(states[0].flatten(), s.flatten(), dim=0).item()
        at_word = F.cosine_similarity(states[0, word], s[word], dim=0).item()
        print(f"| {prompt!r} | {whole:.2f} | {at_word:.2f} |")


if __name__ == "__main__":
    common.cli(main)
