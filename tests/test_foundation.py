"""The package itself: lazy public API, CLI, embedded corpus, tiny factories."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import hf_su
from hf_su.cli import main
from hf_su.data import embedded_corpus, embedded_corpus_stats
from hf_su.testing import TINY_ARCHITECTURES, tiny_config


def test_version_and_lazy_exports():
    assert hf_su.__version__.count(".") == 2
    for name in hf_su.__all__:
        assert getattr(hf_su, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hf_su.nope  # noqa: B018


def test_import_is_lazy():
    # importing the package must not drag in torch/transformers (that is what keeps `import hf_su` fast)
    code = "import sys, hf_su; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_help_and_env(capsys):
    assert main([]) == 2  # no command: help, non-zero
    assert "env" in capsys.readouterr().out
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"torch            {torch.__version__}" in out or torch.__version__ in out
    assert "flash-attn" in out


def test_cli_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "hf_su", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"hf-su {hf_su.__version__}"


def test_embedded_corpus_is_real_deterministic_text():
    docs = list(embedded_corpus())
    assert len(docs) > 100
    text = "\n".join(docs)
    assert len(text) > 1_000_000
    assert "the" in text.split() and "def" in text  # English prose with code
    assert docs == list(embedded_corpus())  # fixed order
    stats = embedded_corpus_stats()
    assert stats["topics_documents"] + stats["docstrings_documents"] == len(docs)


def test_embedded_corpus_max_chars_and_errors():
    full = list(embedded_corpus("topics"))
    for limit in (1000, len(full[0]) + 10):
        cut = list(embedded_corpus("topics", max_chars=limit))
        assert sum(map(len, cut)) == limit
        assert cut[:-1] == full[: len(cut) - 1] and full[len(cut) - 1].startswith(cut[-1])
    with pytest.raises(ValueError, match="unknown embedded corpus source"):
        list(embedded_corpus("wikipedia"))
    with pytest.raises(ValueError, match="max_chars must be positive"):
        list(embedded_corpus(max_chars=0))


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_tiny_models_build_and_run(arch, make_tiny_model):
    model = make_tiny_model(arch)
    ids = torch.randint(3, model.config.vocab_size, (2, 7))
    logits = model(ids).logits
    assert logits.shape == (2, 7, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    again = make_tiny_model(arch)(ids).logits
    torch.testing.assert_close(logits, again, rtol=0, atol=0)  # seeded


def test_tiny_model_float64(make_tiny_model):
    model = make_tiny_model("llama", dtype=torch.float64, attn_implementation="eager")
    assert model(torch.tensor([[1, 5, 9]])).logits.dtype == torch.float64


def test_tiny_config_rejects_unknown_arch():
    with pytest.raises(ValueError, match="unknown tiny architecture 'bert'"):
        tiny_config("bert")


def test_tiny_tokenizer_round_trip(tokenizer):
    text = "def __init__(self):\n    return None  # the answer"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert len(tokenizer) == 512
