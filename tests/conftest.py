"""Shared fixtures: the tiny random model (seconds) for unit tests, the embedded one for a few."""

from __future__ import annotations

from pathlib import Path

import pytest

from empower import models

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    return models.resolve(models.TINY_MODEL)


@pytest.fixture(scope="session")
def tiny(tiny_model_path):
    """(model, tokenizer) of the tiny random Llama, fp32 on CPU."""
    return models.load_model(tiny_model_path, device="cpu")


@pytest.fixture(scope="session")
def smol():
    """(model, tokenizer) of the embedded SmolLM2-135M (integration tests only)."""
    return models.load_model(models.DEFAULT_MODEL, device="cpu")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared problem sets not found at {SHARED_DATA}")
    return SHARED_DATA
