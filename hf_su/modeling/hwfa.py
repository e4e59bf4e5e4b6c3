"""HWFA: hybrid window / full attention models (Su 2023, kexue.fm/archives/9603 and /9731).

Most layers attend causally to a sliding window of the last ``window`` tokens (``i - window < j <= i``) with ordinary
RoPE; a few "full" layers attend to everything. Window layers cost O(n * window) in prefill and keep at most
``window`` tokens of KV cache; only the full layers grow with the context (and only they are switched to ReRoPE at
inference by ``patch_rerope``).

Where the structure lives, so that it is saved by ``save_pretrained``:

- ``config.layer_types`` ("sliding_attention" / "full_attention") and ``config.sliding_window``: transformers builds a
  sliding KV-cache layer (``DynamicSlidingWindowLayer``) for every window layer from these. Qwen2/Qwen3 also read them
  to mask their window layers natively, so a saved Qwen HWFA model is correct under plain transformers with any
  attention implementation.
- ``config.hwfa``: the settings themselves (``window``, ``full_layers``, ``log_scale_base``).
- The attention implementation :data:`HWFA_ATTENTION`, registered with transformers when this module is imported.
  Its window layers run a blocked sliding-window attention in O(n * window) time and memory (a dense n x n masked
  SDPA would be O(n^2)); its full layers run transformers' SDPA. Llama ignores ``sliding_window``, so a Llama HWFA
  model *needs* this implementation; its saved config names it (``"attn_implementation"``), and ``from_pretrained``
  selects it by itself once this module has been imported (without it, transformers refuses the unknown name instead
  of silently running full attention). Loading consumes that key: transformers keeps the implementation only at
  runtime and never writes it back, so a model reloaded with plain ``from_pretrained`` and saved again loses it.
  :func:`load_causal_lm` and :func:`load_config` (which hf_su's evaluation, generation and training use) keep it
  in the config, so what they load re-saves intact, and restore it for a config.json that already lost it. Passing
  another ``attn_implementation`` also loses it (they refuse that).

Caches: the default ``DynamicCache`` (bounded ``DynamicSlidingWindowLayer`` for window layers) and ``StaticCache``
(``StaticSlidingWindowLayer``) give the same results as a full recomputation. ``generate`` with a static cache works
for Qwen; for Llama it is refused with a ValueError, because transformers then precomputes one mask per layer type
and Llama's forward takes a single one (a StaticCache passed to the forward itself works).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .positions import log_n_scale

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = [
    "HWFA_ATTENTION",
    "hwfa_attention_forward",
    "hwfa_config",
    "load_causal_lm",
    "load_config",
    "sliding_window_attention",
]

HWFA_ATTENTION = "hf_su_hwfa"
"""Name under which the HWFA attention (and its mask function) is registered with transformers."""

# model_type -> config fields that switch on the architecture's own per-layer sliding-window support. Llama has
# none: its window layers exist only through HWFA_ATTENTION.
_SUPPORTED: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {"use_sliding_window": True},
    "qwen3": {"use_sliding_window": True},
}
_NATIVE_WINDOW = {"qwen2", "qwen3"}


def hwfa_config(
    config: PretrainedConfig,
    window: int = 64,
    full_layers: Sequence[int] | None = None,
    *,
    log_scale_base: float | None = None,
) -> PretrainedConfig:
    """A copy of ``config`` describing an HWFA model: window attention everywhere except a few full layers.

    Window layers attend to keys ``j`` with ``i - window < j <= i`` (each token sees itself and the ``window - 1``
    tokens before it) with ordinary RoPE; full layers are ordinary causal RoPE attention. Build the model from the
    result as usual (``AutoModelForCausalLM.from_config(cfg)``, or ``from_pretrained(path, config=cfg)`` to convert
    pretrained weights); it trains with any Trainer and saves/reloads with its structure.

    Args:
        config: A llama, qwen2 or qwen3 model config. It is not modified.
        window: Window width ``w`` of the window layers, at least 2. Su's best small-model setting is 64 with two full
            layers; his heuristic is ``w`` = 2-4 x training length / number of layers.
        full_layers: Indices (0-based) of the full-attention layers. ``None`` means the middle layer ``L // 2``.
            Two full layers are best placed at ``L // 3`` and ``2 * L // 3``. An empty list gives a model of window
            layers only.
        log_scale_base: If set (usually the training length ``N``), full layers multiply each query at position
            ``p`` by ``max(1, log(p + 1) / log(N))`` (Su's log-n scale, HWFA 9603). ``None``: no scaling. After
            ``patch_rerope`` the full layers are computed by ReRoPE and use its own scaling option instead.

    Returns:
        A deep copy of ``config`` with ``layer_types``, ``sliding_window`` and ``hwfa`` set and the attention
        implementation :data:`HWFA_ATTENTION` selected.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If the architecture is unsupported, ``window < 2``, a layer index is out of range or repeated,
            or every layer would be a full layer.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in _SUPPORTED:
        raise ValueError(
            f"hwfa_config supports the architectures {sorted(_SUPPORTED)}; got model_type={model_type!r}. Other "
            "architectures either lack per-layer attention types or mask sliding windows their own way."
        )
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int, got {type(window).__name__}")
    if window < 2:
        # A window of 1 lets each token see only itself (no mixing at all), and transformers' sliding cache keeps
        # window - 1 tokens, which for 0 means "keep everything".
        raise ValueError(f"window must be >= 2, got {window}")
    num_layers = config.num_hidden_layers
    full = _full_layer_indices(full_layers, num_layers)
    if len(full) == num_layers:
        raise ValueError(
            f"full_layers={list(full_layers or [])} makes all {num_layers} layers full attention; HWFA needs at least "
            "one window layer (use the original config for an all-full model)"
        )
    if log_scale_base is not None:
        if isinstance(log_scale_base, bool) or not isinstance(log_scale_base, (int, float)):
            raise TypeError(f"log_scale_base must be a number or None, got {type(log_scale_base).__name__}")
        if not log_scale_base > 1:
            raise ValueError(f"log_scale_base must be > 1 (it is a training length), got {log_scale_base}")

    cfg = copy.deepcopy(config)
    cfg.layer_types = ["full_attention" if i in full else "sliding_attention" for i in range(num_layers)]
    cfg.sliding_window = window
    for key, value in _SUPPORTED[model_type].items():
        setattr(cfg, key, value)
    cfg.hwfa = {"window": window, "full_layers": sorted(full), "log_scale_base": log_scale_base}
    cfg._attn_implementation = HWFA_ATTENTION
    if _needs_hwfa_attention(cfg):
        _persist_hwfa_attention(cfg)
    elif "attn_implementation" in cfg.__dict__:
        del cfg.attn_implementation
    return cfg


def _needs_hwfa_attention(config: PretrainedConfig) -> bool:
    """True for HWFA configs that only :data:`HWFA_ATTENTION` computes right: Llama (no window layers of its own)
    and any model with the log-n scale."""
    hwfa = getattr(config, "hwfa", None)
    if not isinstance(hwfa, dict):
        return False
    return getattr(config, "model_type", None) not in _NATIVE_WINDOW or hwfa.get("log_scale_base") is not None


def _persist_hwfa_attention(config: PretrainedConfig) -> None:
    # A plain attribute is written to config.json, which from_pretrained reads to select the implementation. Loading
    # consumes that key (it becomes the runtime-only config._attn_implementation, never saved), so every config that
    # comes out of a load needs it set again, or the next save_pretrained silently drops it.
    config.attn_implementation = HWFA_ATTENTION


def _full_layer_indices(full_layers: Sequence[int] | None, num_layers: int) -> frozenset[int]:
    if full_layers is None:
        return frozenset({num_layers // 2})
    if isinstance(full_layers, (str, bytes)) or not isinstance(full_layers, Sequence):
        raise TypeError(f"full_layers must be a sequence of layer indices or None, got {type(full_layers).__name__}")
    for index in full_layers:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"full_layers must hold ints, got {index!r}")
        if not 0 <= index < num_layers:
            raise ValueError(f"full layer index {index} is out of range for a model of {num_layers} layers")
    if len(set(full_layers)) != len(full_layers):
        raise ValueError(f"full_layers has repeated indices: {list(full_layers)}")
    return frozenset(full_layers)


def sliding_window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    window: int,
    *,
    attention_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    block_size: int = 64,
) -> torch.Tensor:
    """Causal sliding-window attention in O(Lq * window) time and memory.

    Queries and keys are aligned at the end (as a KV cache returns them): query ``t`` sits at key index
    ``t + Lk - Lq`` and attends to key indices ``s`` with ``t + Lk - Lq - window < s <= t + Lk - Lq``.

    The first queries, whose window would reach before key 0, see all their causal keys and form one small causal
    attention. The others are cut into blocks of ``block_size`` queries; each block attends to the
    ``block_size + window - 1`` keys its rows can see, under one band mask shared by all blocks, so no ``Lq x Lk``
    matrix is ever formed.

    Args:
        query: ``[B, H, Lq, D]``.
        key: ``[B, Hkv, Lk, D]`` with ``Lk >= Lq`` and ``H`` a multiple of ``Hkv`` (grouped-query attention).
        value: ``[B, Hkv, Lk, Dv]``.
        window: Window width, at least 1.
        attention_mask: Optional boolean mask broadcastable to ``[B, 1, Lq, Lk]`` (True = may attend), e.g. for
            padding; it is intersected with the window.
        scale: Softmax scale; ``None`` means ``1 / sqrt(D)``.
        dropout_p: Attention dropout probability.
        block_size: Query block length (64 suits CPU kernels; the cost per query grows with
            ``block_size + window``).

    Returns:
        ``[B, H, Lq, Dv]`` (for ``Lq > 1`` a transposed view of a ``[B, Lq, H, Dv]`` tensor, transformers' layout).
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    if kv_len < q_len:
        raise ValueError(f"sliding_window_attention needs at least as many keys as queries, got {kv_len} < {q_len}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            raise TypeError(f"attention_mask must be boolean (True = attend), got {attention_mask.dtype}")
        attention_mask = attention_mask.expand(-1, -1, q_len, kv_len)
    sdpa = dict(scale=scale, dropout_p=dropout_p, enable_gqa=query.shape[1] != key.shape[1])
    if q_len == 1:  # decoding: the window is just the last keys
        keys = slice(max(0, kv_len - window), kv_len)
        mask = attention_mask[..., keys] if attention_mask is not None else None
        return F.scaled_dot_product_attention(query, key[:, :, keys], value[:, :, keys], mask, **sdpa)
    offset = kv_len - q_len
    head = min(q_len, max(0, window - 1 - offset))
    parts = []
    if head:
        # Query t < head has t + offset - window + 1 < 0: its window covers keys 0..t + offset, i.e. plain causal.
        q, k, v = query[:, :, :head], key[:, :, : head + offset], value[:, :, : head + offset]
        if offset == 0 and attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **sdpa)
        else:
            mask = _band(head, head + offset, None, query.device)
            if attention_mask is not None:
                mask = mask & attention_mask[:, :, :head, : head + offset]
            out = F.scaled_dot_product_attention(q, k, v, mask, **sdpa)
        parts.append(out.transpose(1, 2))
    if head < q_len:
        parts.append(_blocked_window_attention(query, key, value, window, head, attention_mask, block_size, sdpa))
    return torch.cat(parts, dim=1).transpose(1, 2) if len(parts) > 1 else parts[0].transpose(1, 2)


def _band(q_len: int, kv_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean ``[q_len, kv_len]`` mask, queries aligned at the end: causal, and ``i - window < j`` if windowed."""
    i = torch.arange(q_len, device=device).unsqueeze(1) + (kv_len - q_len)
    j = torch.arange(kv_len, device=device).unsqueeze(0)
    return (j <= i) & (j > i - window) if window is not None else j <= i


def _blocked_window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    window: int,
    first: int,
    attention_mask: torch.Tensor | None,
    block_size: int,
    sdpa: dict[str, Any],
) -> torch.Tensor:
    """Window attention of queries ``first..Lq-1`` (whose windows start at key >= 0), as ``[B, Lq - first, H, D]``."""
    batch, heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    block = min(block_size, q_len - first)
    num_blocks = -(-(q_len - first) // block)
    span = block + window - 1
    device = query.device
    # Block b holds queries first + b*block + r; its keys start at the window start of its row 0.
    key_start = first + kv_len - q_len - window + 1
    mask = _band(block, span, window, device)  # row r sees columns r .. r + window - 1, in every block
    if attention_mask is not None:
        starts = torch.arange(num_blocks, device=device).unsqueeze(1) * block
        rows = (starts + first + torch.arange(block, device=device)).clamp(max=q_len - 1)
        cols = (starts + key_start + torch.arange(span, device=device)).clamp(max=kv_len - 1)
        user = attention_mask[:, 0, rows.unsqueeze(-1), cols.unsqueeze(1)]  # [B', blocks, block, span]
        mask = (mask & user).expand(batch, -1, -1, -1).reshape(batch * num_blocks, 1, block, span)

    pad = first + num_blocks * block - q_len
    q = F.pad(query[:, :, first:], (0, 0, 0, pad)) if pad else query[:, :, first:]
    # Blocks go to the batch axis: torch's CPU flash kernel takes that 4-D layout with a mask, a 5-D one it does not.
    q = q.reshape(batch, heads, num_blocks, block, -1).transpose(1, 2).reshape(batch * num_blocks, heads, block, -1)
    k, v = (_key_spans(x, key_start, num_blocks, block, span) for x in (key, value))
    out = F.scaled_dot_product_attention(q, k, v, mask, **sdpa)  # [B * blocks, H, block, Dv]
    out = out.view(batch, num_blocks, heads, block, -1).transpose(2, 3).reshape(batch, num_blocks * block, heads, -1)
    return out[:, : q_len - first]


def _key_spans(x: torch.Tensor, start: int, num_blocks: int, block: int, span: int) -> torch.Tensor:
    """``[B, Hkv, L, D]`` -> ``[B * blocks, Hkv, span, D]``: block b gets rows ``start + b * block`` onwards."""
    batch, kv_heads, _, dim = x.shape
    x = x[:, :, start:]
    missing = (num_blocks - 1) * block + span - x.shape[2]
    if missing > 0:  # only rows past the end of the last block look there; zeros keep their softmax finite
        x = F.pad(x, (0, 0, 0, missing))
    spans = x.unfold(2, span, block)[:, :, :num_blocks]  # [B, Hkv, blocks, D, span], a view
    return spans.permute(0, 2, 1, 4, 3).reshape(batch * num_blocks, kv_heads, span, dim)


def hwfa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Transformers attention function of HWFA models (registered as :data:`HWFA_ATTENTION`).

    Layers whose ``config.layer_types`` entry is "sliding_attention" run :func:`sliding_window_attention` with
    ``config.sliding_window``; the others run transformers' SDPA attention, with the log-n query scale when
    ``config.hwfa["log_scale_base"]`` is set.

    Args:
        module: The attention module (provides ``config`` and ``layer_idx``).
        query: ``[B, H, q, D]``, already rotated.
        key: ``[B, Hkv, kv, D]``, the cached keys of this layer followed by the new ones; from a static cache, all
            its slots (filled from slot 0; the empty ones are dropped, see the mask).
        value: ``[B, Hkv, kv, D]``.
        attention_mask: Boolean 4D mask from the registered mask function, or ``None`` (pure causal). Its last
            column is the newest token (transformers' masks, and ours for static caches, end there); without a mask,
            more keys than queries mean a decoding step (one query) or a static cache's first tokens.
        dropout: Attention dropout probability.
        scaling: Softmax scale.
        **kwargs: Passed on to SDPA for full layers (``position_ids``, ``sliding_window``, ...).

    Returns:
        ``(output [B, q, H, D], None)``.
    """
    config = module.config
    present = _present_keys(query.shape[-2], key.shape[-2], attention_mask)
    if present < key.shape[-2]:
        key, value = key[:, :, :present], value[:, :, :present]
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[module.layer_idx] == "sliding_attention":
        mask = attention_mask[..., -key.shape[-2] :] if attention_mask is not None else None
        out = sliding_window_attention(
            query, key, value, config.sliding_window, attention_mask=mask, scale=scaling, dropout_p=dropout
        )
        return out.transpose(1, 2).contiguous(), None
    base = (getattr(config, "hwfa", None) or {}).get("log_scale_base")
    if base is not None:
        query = query * _query_log_scale(kwargs.get("position_ids"), query, key, base)
    kwargs.pop("sliding_window", None)
    out, _ = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )
    return out, None


def _present_keys(q_len: int, kv_len: int, attention_mask: torch.Tensor | None) -> int:
    """The number of leading keys that hold tokens; the keys after them are empty slots of a static cache.

    Dynamic caches return only real keys, the newest last. A static cache returns all its slots, filled from slot 0,
    and then either transformers leaves the mask out (its first tokens: causal from the top-left corner), or the mask
    ends at the newest token (:func:`_hwfa_mask` makes sure of that for models that share one mask between layers).
    """
    if attention_mask is not None:
        return min(kv_len, attention_mask.shape[-1])
    return q_len if q_len > 1 else kv_len


def _query_log_scale(
    position_ids: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, base: float
) -> torch.Tensor:
    q_len = query.shape[-2]
    if position_ids is None:
        position_ids = torch.arange(key.shape[-2] - q_len, key.shape[-2], device=query.device).unsqueeze(0)
    scale = log_n_scale(position_ids[:, -q_len:], base)  # [B or 1, q]
    return scale[:, None, :, None].to(query.dtype)


def _hwfa_mask(
    *,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    config: PretrainedConfig | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    # Window layers apply their band themselves, so a sliding-window mask is only needed for what the band cannot
    # express (padding, packed sequences). Dropping local_size lets transformers return None in the plain causal case
    # instead of materialising an n x n band.
    if config is not None and getattr(config, "model_type", None) not in _NATIVE_WINDOW:
        if local_size is not None:
            # Only generate() asks a Llama config for a per-layer-type mask, when it precomputes masks for a static
            # cache; it then hands Llama's forward a dict of masks, which that forward cannot take.
            raise ValueError(
                f"generate() with a static cache (cache_implementation='static' or a StaticCache) is not supported by "
                f"HWFA {config.model_type} models: transformers then precomputes one attention mask per layer type, "
                f"and {config.model_type}'s forward takes a single mask. Use the default dynamic cache (its window "
                "layers keep at most `window` tokens), or call the model's forward with a StaticCache yourself."
            )
        # Llama hands this one mask to every layer. A static cache sizes it to all its slots, the empty ones too; a
        # mask that ends at the newest token tells each layer which of its keys are real (hwfa_attention_forward).
        present = int(q_offset) + q_length - kv_offset
        if present < kv_length:
            kv_length, allow_is_causal_skip = present, False
    return sdpa_mask(
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        allow_is_causal_skip=allow_is_causal_skip,
        config=config,
        **kwargs,
    )


def load_config(path: str, **kwargs: Any) -> PretrainedConfig:
    """``AutoConfig.from_pretrained(path, **kwargs)``, keeping an HWFA model's attention implementation.

    Use it for a config that a model will be built from and saved again (e.g. to continue training a saved model):
    see :func:`load_causal_lm` for what it keeps.

    Args:
        path: A saved model folder or hub id.
        **kwargs: Passed to ``AutoConfig.from_pretrained``.

    Returns:
        The loaded config.

    Raises:
        ValueError: If ``attn_implementation`` names another implementation for a model that needs
            :data:`HWFA_ATTENTION`.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, **kwargs)
    if _keep_hwfa_attention(config, path, kwargs.get("attn_implementation")):
        config._attn_implementation = HWFA_ATTENTION
    return config


def load_causal_lm(path: str, **kwargs: Any) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)``, keeping an HWFA model's attention implementation.

    Importing this module registers the implementation that a saved HWFA llama names, so such a model loads even
    where nothing else of hf_su was imported (e.g. evaluating a model trained in another process). An HWFA model that
    needs :data:`HWFA_ATTENTION` (Llama, or any with ``log_scale_base``) gets it even if its config.json lost the name
    (a reloaded model saved again before hf_su kept it), and its config keeps the name so that ``save_pretrained``
    writes it again. Other models load exactly as ``from_pretrained`` loads them.

    Args:
        path: A saved model folder or hub id.
        **kwargs: Passed to ``AutoModelForCausalLM.from_pretrained``.

    Returns:
        The loaded model.

    Raises:
        ValueError: If ``attn_implementation`` names another implementation for a model that needs
            :data:`HWFA_ATTENTION` (its window layers would attend to everything, or the log-n scale be skipped).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if _keep_hwfa_attention(model.config, path, kwargs.get("attn_implementation")):
        model.set_attn_implementation(HWFA_ATTENTION)
    return model


def _keep_hwfa_attention(config: PretrainedConfig, path: str, requested: str | None) -> bool:
    """Persist :data:`HWFA_ATTENTION` in a loaded config that needs it; True if it must also be selected at runtime
    (its config.json lost the name). Refuses an explicitly requested other implementation."""
    if not _needs_hwfa_attention(config):
        return False
    switch = config._attn_implementation != HWFA_ATTENTION
    if switch and requested is not None:
        lost = (
            "its window layers would attend to the whole sequence"
            if config.model_type not in _NATIVE_WINDOW
            else "its full layers would skip the log-n scale"
        )
        raise ValueError(
            f"{path!r} is an HWFA {config.model_type} model that needs attn_implementation={HWFA_ATTENTION!r}; got "
            f"attn_implementation={requested!r}, under which {lost}"
        )
    _persist_hwfa_attention(config)
    return switch


AttentionInterface.register(HWFA_ATTENTION, hwfa_attention_forward)
AttentionMaskInterface.register(HWFA_ATTENTION, _hwfa_mask)
