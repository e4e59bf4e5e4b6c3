"""Tiny, seeded, randomly initialised models and tokenizers for tests, benchmarks and examples.

Everything is built from configs and the embedded corpus: nothing is downloaded. Sizes are chosen so a forward pass
takes milliseconds on a CPU while still exercising what matters (grouped-query attention, several layers, per-arch
rotary variants).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

# Architectures the tiny factory knows. "gpt2" has no rotary embedding and "falcon" cannot take a custom attention
# implementation: both exist to test that patches refuse them clearly.
TINY_ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma3",
    "phi3",
    "phi",
    "gpt_neox",
    "gpt2",
    "falcon",
)
ROPE_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3", "phi3", "phi", "gpt_neox")

_SPECIAL_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # as tiny_tokenizer() assigns them
_COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=2048,
    **_SPECIAL_IDS,
)

_TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "llama": dict(num_key_value_heads=2, intermediate_size=128),
    "mistral": dict(num_key_value_heads=2, intermediate_size=128, sliding_window=None),
    "qwen2": dict(num_key_value_heads=2, intermediate_size=128),
    "qwen3": dict(num_key_value_heads=2, intermediate_size=128, head_dim=16),
    "gemma": dict(num_key_value_heads=2, intermediate_size=128, head_dim=16),
    "gemma3": dict(
        num_key_value_heads=2, intermediate_size=128, head_dim=16, sliding_window=16, sliding_window_pattern=2
    ),
    "phi3": dict(num_key_value_heads=2, intermediate_size=128),
    "phi": dict(num_key_value_heads=2, intermediate_size=128, partial_rotary_factor=0.5),
    "gpt_neox": dict(intermediate_size=128, rotary_pct=0.25),
    # gpt2 names its sizes differently; it gets no _COMMON (see tiny_config)
    "gpt2": dict(vocab_size=512, n_embd=64, n_head=4, n_layer=2, n_positions=2048, **_SPECIAL_IDS),
    "falcon": dict(num_kv_heads=1, new_decoder_architecture=False, multi_query=True),
}


def tiny_config(arch: str = "llama", **overrides: Any) -> PretrainedConfig:
    """A small config of the named architecture (see :data:`TINY_ARCHITECTURES`); ``overrides`` win."""
    from transformers import AutoConfig

    if arch not in _TINY_OVERRIDES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {TINY_ARCHITECTURES}")
    base = {} if arch == "gpt2" else _COMMON
    kwargs = {**base, **_TINY_OVERRIDES[arch], **overrides}
    if arch == "gemma3":
        return AutoConfig.for_model("gemma3_text", **kwargs)
    return AutoConfig.for_model(arch, **kwargs)


def tiny_causal_lm(
    arch: str = "llama",
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    **overrides: Any,
) -> PreTrainedModel:
    """A randomly initialised (seeded) causal LM of the named architecture, in eval mode.

    ``dtype=torch.float64`` gives a model for exact comparisons against float64 references.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def tiny_tokenizer(vocab_size: int = 512, *, max_chars: int = 200_000) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the first ``max_chars`` of the embedded corpus (takes ~1 s).

    Special tokens ``<pad>``, ``<s>``, ``</s>`` get ids 0, 1, 2; padding is on the left (as for generation).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .data import embedded_corpus

    specials = ["<pad>", "<s>", "</s>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(embedded_corpus("topics", max_chars=max_chars), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


def shared_data_path(name: str) -> str | None:
    """Path of a file in the project's shared data folder (real corpora, the released BytePiece model), or None.

    Looks in ``$HF_SU_SHARED_DATA`` and in ``shared/data`` beside the repository checkout. Tests and benchmarks that
    use it skip cleanly when it returns None: the core suite never needs it.
    """
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folders = [os.environ.get("HF_SU_SHARED_DATA"), os.path.join(repo, "..", "shared", "data")]
    for folder in filter(None, folders):
        path = os.path.normpath(os.path.join(folder, name))
        if os.path.exists(path):
            return path
    return None


# torch's gloo backend occasionally aborts a rank from one of its threads ("terminate called without an active
# exception", SIGABRT) in a run that is otherwise fine; seen about once in eight 2-rank CPU runs with torch 2.13.
_GLOO_ABORT = "terminate called without an active exception"


def run_torchrun(args: list[str], *, nproc: int = 2, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    """Run ``python -m torch.distributed.run --standalone --nproc_per_node nproc *args``; return its stdout.

    A run that fails only by gloo's spurious abort is retried once; any other failure raises ``AssertionError`` with
    the tail of stderr.
    """
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    for attempt in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode == 0:
            return proc.stdout
        if _GLOO_ABORT not in proc.stderr or attempt == 1:
            raise AssertionError(f"torchrun failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    raise AssertionError("unreachable")
