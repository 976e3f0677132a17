"""Shared fixtures: a tiny random Stable-Diffusion-architecture pipeline (the "SD path")."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The README runs the suite on two pytest-xdist workers ("-n 2"). Each worker then gets one core: one
# torch thread, and OMP_NUM_THREADS=1 for the scripts it starts (two threads each would make four
# on a 2-core machine, and oversubscribed torch threads wait on each other).
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1 if WORKER else max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow(seconds): a test left out of the fast tier "
                                       "(`pytest -m 'not slow'`), with its duration measured in one run of "
                                       "the suite, so the full suite can start the longest first")


def pytest_collection_modifyitems(items):
    """Send every test that reads the quick start's output to one worker (with "--dist loadgroup"),
    so the README's first command runs once per suite, not once per worker; and start the longest
    tests first, so that neither worker is left with a long one at the end while the other idles."""
    for item in items:
        if "quick_start" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("quick_start"))
    def duration(item) -> float:
        slow = item.get_closest_marker("slow")
        return slow.args[0] if slow else 0
    items.sort(key=duration, reverse=True)


def make_tiny_sd(folder: Path, **settings: object) -> Path:
    """A random pipeline with SD v1's module layout (CrossAttnDownBlock2D, attn1/attn2, a CLIP
    text encoder, an AutoencoderKL), small enough to run in a second on a CPU. `settings`
    overrides the scheduler's settings (e.g. prediction_type="v_prediction" for an SD 2.x-like one)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    from toy.build import SCHEDULER, build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer(folder / "tok-src")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=16,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=16)
    scheduler = DDIMScheduler(**{**SCHEDULER, **settings})  # SD v1's noise schedule, as the toy uses
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out = folder / ("tiny-sd" + "".join(f"-{k}-{v}" for k, v in sorted(settings.items())))
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def make_tiny_sdxl(folder: Path) -> Path:
    """A random pipeline with SDXL's layout: two CLIP text encoders (the second with a projection,
    whose pooled output the UNet takes), a UNet with added "text_time" conditioning (the pooled
    embedding and six size/crop numbers), an AutoencoderKL; small enough for a second on a CPU."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from toy.build import SCHEDULER, build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer(folder / "tok-src")
    text = dict(vocab_size=len(tokenizer), intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, **text))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=24, **text))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24 + 6 * 8, norm_num_groups=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=16,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=16)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=DDIMScheduler(**SCHEDULER))
    out = folder / "tiny-sdxl"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    return make_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("sd"))


# SD 2.x's scheduler: v-prediction (the 768 px models), steps offset by one, alpha_T not set to one
SD2_SCHEDULER = dict(prediction_type="v_prediction", steps_offset=1, set_alpha_to_one=False, clip_sample=False)


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("sd2"), **SD2_SCHEDULER)


# UNLEARN_TEST_DEVICE=cuda runs the toy-model tests on a GPU (the GPU path); CI uses the CPU.
DEVICE = torch.device(os.environ.get("UNLEARN_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="session")
def toy_models():
    import common
    return common.load_models("toy", DEVICE)


def run_script(script: str, *args: str, timeout: int = 900):
    """Run a method (or eval.py) end to end in a subprocess from the repository root."""
    import subprocess
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def changed_parameters(unet_folder: Path, base_folder: Path) -> set[str]:
    """Names of the UNet parameters that differ between a saved run and its base model."""
    from diffusers import UNet2DConditionModel
    new = UNet2DConditionModel.from_pretrained(unet_folder).named_parameters()
    old = UNet2DConditionModel.from_pretrained(base_folder).named_parameters()
    return {n for (n, p), (_, q) in zip(new, old) if not torch.equal(p, q)}


def readme_blocks(language: str) -> list[str]:
    """The README's fenced code blocks of one language, in order."""
    import re
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def readme_quick_start() -> list[str]:
    """The two quick-start commands: the first bash block of the README."""
    return [line for line in readme_blocks("bash")[0].splitlines() if line.strip()]


@pytest.fixture(scope="session")
def quick_start(tmp_path_factory) -> Path:
    """Run the README's first quick-start command verbatim, in a fresh folder that holds the
    project's files (so its outputs/ starts empty), and return that folder."""
    import subprocess
    sandbox = tmp_path_factory.mktemp("quick_start")
    for entry in ROOT.iterdir():
        if entry.suffix == ".py" or entry.name in ("toy", "requirements.txt"):
            (sandbox / entry.name).symlink_to(entry)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run(["bash", "-c", readme_quick_start()[0]], cwd=sandbox, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return sandbox


def make_tiny_uncond(folder: Path) -> Path:
    """A random unconditional latent pipeline (LDMPipeline: the toy's VAE, a small UNet2DModel,
    the toy's scheduler) of toy-uncond's layout, with the toy's vocabulary beside it (toy.json in
    the parent folder, as a copy of the toy keeps it), so the judge and class sets work on it."""
    import shutil

    from diffusers import AutoencoderKL, DDIMScheduler, LDMPipeline, UNet2DModel

    import common
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                       block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=16)
    toy = common.TOY_DIR / "pipeline"
    vae = AutoencoderKL.from_pretrained(toy, subfolder="vae")
    scheduler = DDIMScheduler.from_pretrained(toy, subfolder="scheduler")
    shutil.copy(common.TOY_DIR / "toy.json", folder / "toy.json")
    LDMPipeline(vqvae=vae, unet=unet, scheduler=scheduler).save_pretrained(folder / "uncond", safe_serialization=True)
    return folder / "uncond"


@pytest.fixture(scope="session")
def tiny_uncond(tmp_path_factory) -> Path:
    return make_tiny_uncond(tmp_path_factory.mktemp("uncond"))
