import json
from pathlib import Path

import pytest
import torch

from empower import models


def test_embedded_gguf_hash_is_verified():
    path = models.embedded_gguf("smollm2-135m")
    assert path.name.endswith(".gguf")
    assert models._sha256([path]) == models.EMBEDDED["smollm2-135m"].sha256


def test_hash_mismatch_is_a_clear_error(monkeypatch):
    bad = models.EmbeddedModel(
        name="smollm2-135m",
        parts=models.EMBEDDED["smollm2-135m"].parts,
        sha256="0" * 64,
        install_hint="reinstall",
    )
    monkeypatch.setitem(models.EMBEDDED, "smollm2-135m", bad)
    with pytest.raises(ValueError, match="sha256"):
        models.embedded_gguf("smollm2-135m")


def test_missing_wheel_names_the_package(monkeypatch):
    missing = models.EmbeddedModel(
        name="x", parts=(("no-such-wheel", "x/y.gguf"),), sha256="0", install_hint="pip x"
    )
    monkeypatch.setitem(models.EMBEDDED, "x", missing)
    with pytest.raises(FileNotFoundError, match="no-such-wheel"):
        models.embedded_gguf("x")


def test_embedded_cache_is_safetensors():
    folder = Path(models.resolve("smollm2-135m"))
    assert list(folder.glob("*.safetensors"))
    assert (
        json.loads((folder / "empower-model.json").read_text())["sha256"]
        == models.EMBEDDED["smollm2-135m"].sha256
    )


def test_tiny_model_shares_the_embedded_tokenizer(tiny):
    model, tokenizer = tiny
    smol_tok = models.load_tokenizer("smollm2-135m")
    text = "def add(a, b):\n    return a + b\n"
    assert tokenizer(text)["input_ids"] == smol_tok(text)["input_ids"]
    assert model.config.num_hidden_layers == 2 and model.dtype == torch.float32
    assert tokenizer.pad_token is not None


@pytest.mark.parametrize("spec", ["no-such-model", "./missing/folder", "/tmp/none.gguf"])
def test_unresolvable_specs_are_refused(spec):
    with pytest.raises(ValueError, match="model"):
        models.resolve(spec)


def test_hub_ids_pass_through_for_users_with_network():
    assert models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_local_folder_loads(tmp_path, tiny):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = models.load_model(tmp_path, device="cpu")
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(loaded(ids).logits, model(ids).logits)


def test_gguf_file_loads_directly():
    model, tokenizer = models.load_model(models.embedded_gguf("smollm2-135m"), device="cpu")
    assert model.config.model_type == "llama" and tokenizer.eos_token == "<|im_end|>"


def test_a_pool_loads_a_model_once_for_every_role_that_names_it(tiny_model_path):
    """The assistant, its threshold estimator and the LLM human name one model: it is loaded once."""
    from empower.assistant import AssistantConfig, build_assistant
    from empower.humans import HumanConfig, build_human

    pool = models.ModelPool()
    config = AssistantConfig(assistant=tiny_model_path, policy="threshold", estimator=models.TINY_MODEL)
    assistant = build_assistant(config, pool=pool)
    human = build_human(HumanConfig(human="llm", human_model=models.TINY_MODEL), pool=pool)
    assert len(pool.loaded()) == 1  # the embedded name and its folder are one model
    assert assistant.estimator.model is assistant.engine.model is human.backend.engine.model
    assert pool.load(models.TINY_MODEL, dtype="float64")[0] is not assistant.engine.model  # another dtype
    pool.retain([models.TINY_MODEL, ""])
    assert len(pool.loaded()) == 2
    pool.retain([])
    assert pool.loaded() == [] and pool.load(tiny_model_path)[0] is not assistant.engine.model  # loaded anew
