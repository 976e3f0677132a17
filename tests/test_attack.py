"""attack.py: the textual-inversion attack on a saved run."""

import hashlib
import json

import pytest
import torch

import attack
import common
from conftest import DEVICE, run_script


def digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.slow(54)
def test_attack_recovers_circle_from_the_base_model_and_only_reads_the_run(quick_start):
    """The README's PURE run on circle, attacked with the default budget: the control (the same
    attack on the base model) recovers the concept, and the saved UNet is bit-identical after."""
    run = quick_start / "outputs" / "pure-circle"
    before = digest(run / "unet")
    r = run_script("attack.py", "--run", run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "attack budget: steps 150, lr 0.01, batch_size 16, n_images 64, init_word shape" in r.stdout
    result = json.loads((run / "attack.json").read_text())
    assert result["asr_base"] >= 0.8, result          # the attack works: it brings circle back from the base
    assert 0 <= result["asr"] <= 1 and result["n_eval_images"] == 64
    assert result["nearest_words"] and result["budget"]["steps"] == 150
    assert (run / "attack.png").stat().st_size > 0
    assert digest(run / "unet") == before
    again = run_script("attack.py", "--run", run)    # never overwritten silently
    assert again.returncode == 2 and "--overwrite" in again.stderr


@pytest.mark.slow(6)
def test_a_folder_that_is_not_a_run_is_one_sentence(tmp_path):
    r = run_script("attack.py", "--run", tmp_path)
    assert r.returncode == 2 and "is not a saved run" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture()
def fresh_toy():
    # attack.Placeholder adds a token to the tokenizer: keep it away from the shared toy_models
    return common.load_models("toy", DEVICE)


@pytest.mark.slow(16)
def test_only_the_placeholder_embedding_learns(fresh_toy):
    models = fresh_toy
    encoder_before = {k: v.clone() for k, v in models.text_encoder.state_dict().items()}
    unet_before = {k: v.clone() for k, v in models.unet.state_dict().items()}
    models.unet.requires_grad_(False)
    args = attack.Args(run="x", steps=3, lr=1e-2, batch_size=4, n_images=4, init_word="shape")
    x0 = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    placeholder, _ = attack.learn_embedding(args, models, models.unet, x0, "a <v*>", "test")
    init = models.text_encoder.get_input_embeddings().weight[placeholder.init_id]
    assert not torch.equal(placeholder.v.detach(), init)            # v moved ...
    assert placeholder.v.grad is not None
    for k, v in models.text_encoder.state_dict().items():           # ... and nothing else did
        if k.endswith("token_embedding.weight"):
            assert torch.equal(v[:len(v) - 1], encoder_before[k])   # the old rows; the new row is never read
        else:
            assert torch.equal(v, encoder_before[k]), k
    assert all(torch.equal(v, unet_before[k]) for k, v in models.unet.state_dict().items())
    assert all(p.grad is None for p in models.unet.parameters())


@pytest.mark.slow(2)
def test_the_learned_token_is_neither_the_concept_nor_its_synonym(fresh_toy):
    models = fresh_toy
    plain = common.encode_prompts(models, ["a circle"]).clone()
    placeholder = attack.Placeholder(models, "shape")
    tok = models.tokenizer
    concept_ids = set(tok("circle disc", add_special_tokens=False).input_ids)
    assert placeholder.token_id not in concept_ids and placeholder.init_id not in concept_ids
    assert tok.convert_ids_to_tokens(placeholder.token_id) == "<v*>"
    with torch.no_grad():
        states = placeholder.text_states(["a <v*>", "a circle"])
    assert not torch.allclose(states[0], plain[0])
    assert torch.equal(states[1], plain[0])                         # other prompts are untouched
    placeholder.remove()
    ps = common.concept_prompts("circle", models)
    for word in ("circle", "disc", "Circle"):
        with pytest.raises(common.UsageError, match="names the concept"):
            attack.check_init_word(word, ps)
    attack.check_init_word("shape", ps)


def test_sampling_from_given_text_states_equals_sampling_from_the_prompts(toy_models):
    prompts, seeds = ["a circle", "a striped square"], [3, 4]
    states = common.encode_prompts(toy_models, prompts)
    a = common.sample(toy_models, prompts, seeds, steps=4, decode=False).latents
    b = common.sample(toy_models, ["ignored", "ignored"], seeds, steps=4, decode=False, text_states=states).latents
    assert torch.equal(a, b)


def test_the_attack_learns_on_the_sd_path(tiny_sd2):
    """The same code on an SD-architecture model (v-prediction): the placeholder goes into the SD
    template, the loss is finite and v moves."""
    models = common.load_models(str(tiny_sd2), torch.device("cpu"))
    ps = common.concept_prompts("church", models)
    prompt = attack.template(models, ps)
    assert prompt == "a photo of <v*>"
    with pytest.raises(common.UsageError, match="names the concept"):
        attack.check_init_word("chapel", ps)
    args = attack.Args(run="x", steps=2, lr=1e-2, batch_size=2, n_images=2, init_word="shape")
    x0 = torch.randn(2, 4, 8, 8)
    placeholder, final_loss = attack.learn_embedding(args, models, models.unet.requires_grad_(False), x0, prompt, "test")
    assert final_loss == final_loss and final_loss > 0
    assert not torch.equal(placeholder.v.detach(), models.text_encoder.get_input_embeddings().weight[placeholder.init_id])
