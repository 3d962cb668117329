"""Shared fixtures: tiny tokenizers and models built offline, once per test session."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from trl_polar.tiny import build_tiny_causal_lm, build_tiny_reward_model, build_tiny_tokenizer

SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    """A byte-level BPE tokenizer (BOS <s>, EOS </s>, pad <pad>, POLAR tokens registered), saved to disk."""
    path = tmp_path_factory.mktemp("tokenizer")
    build_tiny_tokenizer(path)
    return str(path)


@pytest.fixture
def tiny_tokenizer(tiny_tokenizer_dir):
    """A fresh copy per test, loaded as users load tokenizers (so tests may change it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def plain_tokenizer_dir(tmp_path_factory) -> str:
    """The same kind of tokenizer without the POLAR tokens: what a fresh backbone ships."""
    path = tmp_path_factory.mktemp("plain_tokenizer")
    build_tiny_tokenizer(path, polar_tokens=False)
    return str(path)


def _model_dir(tmp_path_factory, tokenizer_dir, name, builder, arch):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp(name)
    builder(AutoTokenizer.from_pretrained(tokenizer_dir), arch=arch, out_dir=path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_qwen2_rm_dir(tmp_path_factory, tiny_tokenizer_dir) -> str:
    """A saved tiny Qwen2 POLAR reward model (random, non-zero head) with its tokenizer."""
    return _model_dir(tmp_path_factory, tiny_tokenizer_dir, "qwen2_rm", build_tiny_reward_model, "qwen2")


@pytest.fixture(scope="session")
def tiny_llama_rm_dir(tmp_path_factory, tiny_tokenizer_dir) -> str:
    """A saved tiny Llama POLAR reward model (random, non-zero head) with its tokenizer."""
    return _model_dir(tmp_path_factory, tiny_tokenizer_dir, "llama_rm", build_tiny_reward_model, "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_lm_dir(tmp_path_factory, plain_tokenizer_dir) -> str:
    """A saved tiny Qwen2 causal LM whose tokenizer lacks the POLAR tokens: a backbone as users bring it."""
    return _model_dir(tmp_path_factory, plain_tokenizer_dir, "qwen2_lm", build_tiny_causal_lm, "qwen2")


@pytest.fixture(scope="session")
def tiny_llama_lm_dir(tmp_path_factory, plain_tokenizer_dir) -> str:
    """A saved tiny Llama causal LM whose tokenizer lacks the POLAR tokens."""
    return _model_dir(tmp_path_factory, plain_tokenizer_dir, "llama_lm", build_tiny_causal_lm, "llama")


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """../shared/fixtures beside the checkout; tests that need it skip where it is absent."""
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(f"{SHARED_FIXTURES} is absent (it lies beside the project checkout in CI)")
    return SHARED_FIXTURES


@pytest.fixture
def polar_env(monkeypatch, tiny_qwen2_rm_dir):
    """The adapters' environment on the library's defaults: only the model (the tiny Qwen2) and the CPU are set."""
    for key in [k for k in os.environ if k.startswith("TRL_POLAR_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("TRL_POLAR_MODEL", tiny_qwen2_rm_dir)
    monkeypatch.setenv("TRL_POLAR_DEVICE", "cpu")
    return tiny_qwen2_rm_dir
