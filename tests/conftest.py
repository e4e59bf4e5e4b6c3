"""Shared fixtures: tiny seeded models built from configs, a tiny tokenizer, float64 switches. No network."""

from __future__ import annotations

import os

# Tests never reach a hub: fail fast instead of waiting on a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from hf_su.testing import ROPE_ARCHITECTURES, tiny_causal_lm, tiny_tokenizer  # noqa: E402

# The architectures every ReRoPE-style patch must support (issue #3); partial-rotary ones are extra.
CORE_ROPE_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3", "phi3")


@pytest.fixture(params=["c", "backend"])
def bytepiece_segmenter(request, monkeypatch) -> str:
    """Run a BytePiece test through the C segmenter and through the fallback used without a C compiler."""
    from hf_su.tokenization import bytepiece

    if request.param == "c" and bytepiece._viterbi is None:
        pytest.skip("the C segmenter hf_su.tokenization._viterbi is not built")
    if request.param == "backend":
        monkeypatch.setattr(bytepiece, "_viterbi", None)
    return request.param


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def make_tiny_model():
    """Factory: ``make_tiny_model("qwen2", dtype=torch.float64, num_hidden_layers=3)`` -> eval-mode model."""
    return tiny_causal_lm


@pytest.fixture(params=CORE_ROPE_ARCHITECTURES)
def rope_arch(request) -> str:
    """Each core RoPE architecture in turn."""
    return request.param


@pytest.fixture(params=ROPE_ARCHITECTURES)
def any_rope_arch(request) -> str:
    """Each RoPE architecture the tiny factory knows, partial rotary (phi, gpt_neox) included."""
    return request.param


@pytest.fixture(params=[torch.float32, torch.float64], ids=["fp32", "fp64"])
def float_dtype(request) -> torch.dtype:
    """Run a test in float32 and float64; compare with :func:`tolerance`."""
    return request.param


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``torch.testing.assert_close`` tolerances for comparing against a float64 reference."""
    return {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}[dtype]


@pytest.fixture(scope="session")
def tokenizer():
    """A 512-token byte-level BPE trained on the embedded corpus; pad/bos/eos = 0/1/2, left padding."""
    return tiny_tokenizer()
