"""ReRoPE and Leaky ReRoPE for Hugging Face RoPE models: ``patch_rerope`` / ``unpatch_rerope``.

How the patch plugs into transformers (5.x), without touching any modeling class:

1. The model's rotary module gets a forward hook that returns ``cos = 1, sin = 0``. Every attention module then
   hands **un-rotated** queries and keys to the attention function, and the KV cache stores un-rotated keys.
2. A registered attention implementation (``AttentionInterface`` + ``AttentionMaskInterface``, selected with
   ``model.set_attn_implementation``) rotates them itself, per layer:

   * ReRoPE layers (all layers, or those whose ``config.layer_types`` entry is ``"full_attention"``): the two-part
     attention of :mod:`hf_su.modeling.attention` (near keys: RoPE; far keys: ReRoPE / Leaky ReRoPE positions from
     :mod:`hf_su.modeling.positions`), with optional log-n query scaling;
   * every other layer (sliding-window layers of hybrid models): ordinary RoPE, then the attention function the model
     had before patching, with the same arguments, so those layers compute exactly what they computed before.

   The mask function of the previous implementation is reused, so padding and sliding-window masks are unchanged.

Positions come from ``position_ids``; cached keys are the most recent ones (as in ``DynamicCache``, including its
sliding layers), so key ``j`` of ``kv`` sits ``kv - 1 - j`` tokens before the last query.

Decoding (one new token) does per layer what one plain attention does, plus small matrix products: the positions
keys are rotated to do not depend on the query, so the near keys (and Leaky ReRoPE's far keys) are rotated once and
kept per cache (:class:`_RotatedKeys`, checked against the cache before every step), the query's rotations come
from matrices made for a block of upcoming positions, and ReRoPE's far keys are the cached raw keys.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .attention import (
    Rotated,
    decode_mask,
    near_far_ranges,
    two_part_attention,
    two_part_attention_decode,
    two_part_attention_dense,
)
from .positions import (
    apply_rotary,
    check_rerope_settings,
    far_key_positions,
    far_query_positions,
    log_n_scale,
    rotation_matrices,
)

Tensor = torch.Tensor

CONFIG_ATTRIBUTE = "rerope"
"""Name of the config attribute that stores the patch settings (saved by ``save_pretrained``)."""

_IMPLEMENTATION_PREFIX = "hf_su_rerope_"
_STATE_ATTRIBUTE = "_hf_su_rerope"
_DEFAULT_WINDOW = 512
# rope types whose frequencies depend on the sequence length: their cos/sin at a re-mapped position are not defined
_UNSUPPORTED_ROPE_TYPES = ("dynamic", "longrope")


@dataclass(frozen=True)
class ReRoPESettings:
    """The settings of a ReRoPE patch (see :func:`patch_rerope`)."""

    window: int = _DEFAULT_WINDOW
    leaky: float | None = None
    log_scale_base: float | None = None

    def __post_init__(self) -> None:
        check_rerope_settings(self.window, self.leaky, self.log_scale_base)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _LayerState:
    """What the attention function needs to know about one patched attention module."""

    settings: ReRoPESettings
    apply_rerope: bool  # False: ordinary RoPE + the previous attention function
    rope: _Rope
    previous: Callable[..., tuple[Tensor, Tensor | None]]
    identity_at_zero: bool  # rotating to position 0 is the identity (ReRoPE's far keys can stay raw)
    decoding: _DecodingState
    layer_idx: int


@dataclass
class _ModelState:
    settings: ReRoPESettings
    previous_implementation: str
    hooks: list[Any]


@dataclass
class _DecodingState:
    """Shared by a patched model and its layers: the KV cache of the forward pass in progress (set by the model's
    forward pre-hook, None outside a forward or when the cache was not passed by keyword) and, per cache, the layers'
    rotated keys (:class:`_RotatedKeys`), dropped with the cache."""

    cache: Any = None
    rotated: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    layers: dict[tuple[int, str], _RotatedKeys] | None = None  # rotated[cache] during a forward pass with a cache


# --------------------------------------------------------------------------------------------------------------------
# Public API


def patch_rerope(
    model: nn.Module,
    window: int | None = None,
    *,
    leaky: float | None = None,
    log_scale_base: float | None = None,
) -> nn.Module:
    """Make a Hugging Face RoPE model use ReRoPE (or Leaky ReRoPE) attention, in place.

    A query at position ``i`` and a key at ``j <= i`` use the relative position ``d = i - j`` when ``d < window``
    and ``window`` otherwise (ReRoPE), or ``window + (d - window) / leaky`` (Leaky ReRoPE). With ``log_scale_base=L``
    queries are also scaled by ``max(1, log(i + 1) / log(L))`` (Su's log-n scaling; ``L`` = training length).

    Prefill runs a near (sliding-window) and a far (causal) attention merged by their log-sum-exps: exact, O(n)
    memory, gradients included. Decoding keeps un-rotated keys in the ordinary ``DynamicCache``. Models with
    ``config.layer_types`` get ReRoPE in their ``"full_attention"`` layers only; other layers run unchanged on the
    attention backend the model had.

    Patching twice with the same settings is a no-op; different settings raise (call :func:`unpatch_rerope` first).
    The settings are stored in ``model.config.rerope`` and saved with ``save_pretrained``: after
    ``from_pretrained``, ``patch_rerope(model)`` without arguments restores the saved patch.

    Args:
        model: A transformers causal LM (llama, mistral, qwen2/3, gemma/gemma3, phi3, phi, gpt_neox, ...).
        window: The window ``w >= 1`` (default: the saved value, else 512). Su suggests 1/4 to 1/2 of the training
            length.
        leaky: ``None`` for ReRoPE, or ``k > 1`` for Leaky ReRoPE with slope ``1/k`` beyond the window.
        log_scale_base: The training length ``L`` for log-n query scaling, or ``None`` to disable it.

    Returns:
        The same model, patched.

    Raises:
        ValueError: Invalid settings, a model without rotary embeddings (gpt2), one whose attention cannot be
            replaced (falcon), an unsupported rope type, or a model already patched with other settings.
    """
    settings = _resolve_settings(model, window, leaky, log_scale_base)
    state: _ModelState | None = getattr(model, _STATE_ATTRIBUTE, None)
    if state is not None:
        if state.settings == settings:
            return model
        raise ValueError(
            f"model is already patched with {state.settings}; call unpatch_rerope(model) before patching with {settings}"
        )

    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(model).__name__} does not dispatch its attention through transformers' AttentionInterface "
            "(e.g. falcon), so ReRoPE cannot replace its attention"
        )
    rotary = _find_rotary_module(model)
    attention_modules = _find_attention_modules(model)
    previous = _previous_implementation(attention_modules)
    name = _register_implementation(previous)

    ropes: dict[str, _Rope] = {}
    decoding = _DecodingState()
    states = {module: _layer_state(module, ropes, rotary, settings, previous, decoding) for module in attention_modules}
    if not any(s.apply_rerope for s in states.values()):
        raise ValueError("config.layer_types has no 'full_attention' layer: there is no layer to apply ReRoPE to")

    hooks = [
        rotary.register_forward_hook(_unrotated_rotary_output),
        model.register_forward_pre_hook(functools.partial(_before_forward, decoding), with_kwargs=True),
        model.register_forward_hook(functools.partial(_after_forward, decoding), always_call=True),
    ]
    for module, layer_state in states.items():
        setattr(module, _STATE_ATTRIBUTE, layer_state)
    setattr(model, _STATE_ATTRIBUTE, _ModelState(settings, previous, hooks))
    try:
        model.set_attn_implementation(name)
        wrong = [m for m in attention_modules if m.config._attn_implementation != name]
        if wrong:
            raise ValueError(f"could not switch {type(wrong[0]).__name__} to the ReRoPE attention implementation")
    except Exception:
        saved = getattr(model.config, CONFIG_ATTRIBUTE, None)
        unpatch_rerope(model)  # leave the model exactly as it came, saved settings included
        if saved is not None:
            setattr(model.config, CONFIG_ATTRIBUTE, saved)
        raise
    setattr(model.config, CONFIG_ATTRIBUTE, settings.to_dict())
    return model


def unpatch_rerope(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_rerope` in place: the previous attention backend, rotary module and config come back.

    Args:
        model: A model patched by :func:`patch_rerope`.

    Returns:
        The same model, computing exactly what it computed before patching.

    Raises:
        ValueError: If the model is not patched.
    """
    state: _ModelState | None = getattr(model, _STATE_ATTRIBUTE, None)
    if state is None:
        raise ValueError("model is not patched with ReRoPE (patch_rerope was not called on it)")
    model.set_attn_implementation(state.previous_implementation)
    for hook in state.hooks:
        hook.remove()
    for module in model.modules():
        if hasattr(module, _STATE_ATTRIBUTE) and module is not model:
            delattr(module, _STATE_ATTRIBUTE)
    delattr(model, _STATE_ATTRIBUTE)
    if hasattr(model.config, CONFIG_ATTRIBUTE):
        delattr(model.config, CONFIG_ATTRIBUTE)
    return model


# --------------------------------------------------------------------------------------------------------------------
# Patch-time discovery and checks


def _resolve_settings(
    model: nn.Module, window: int | None, leaky: float | None, log_scale_base: float | None
) -> ReRoPESettings:
    """Explicit arguments win; with none given, the settings saved in the config (else the defaults) apply."""
    if window is None and leaky is None and log_scale_base is None:
        saved = getattr(getattr(model, "config", None), CONFIG_ATTRIBUTE, None)
        if saved is not None:
            if not isinstance(saved, dict) or set(saved) - {"window", "leaky", "log_scale_base"}:
                raise ValueError(f"config.{CONFIG_ATTRIBUTE} is not a ReRoPE settings dict: {saved!r}")
            return ReRoPESettings(**saved)
    return ReRoPESettings(_DEFAULT_WINDOW if window is None else window, leaky, log_scale_base)


def _find_rotary_module(model: nn.Module) -> nn.Module:
    rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if not rotaries:
        raise ValueError(
            f"{type(model).__name__} has no rotary embedding module: ReRoPE needs a RoPE model "
            "(gpt2-style absolute position embeddings are not supported)"
        )
    if len(rotaries) > 1:
        raise ValueError(f"{type(model).__name__} has {len(rotaries)} rotary modules; ReRoPE supports models with one")
    rotary = rotaries[0]
    params = getattr(rotary.config, "rope_parameters", None) or {}
    per_type = params.values() if all(isinstance(v, dict) for v in params.values()) and params else [params]
    for p in per_type:
        if p.get("rope_type", "default") in _UNSUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_type {p['rope_type']!r} changes its frequencies with the sequence length; ReRoPE needs fixed "
                f"frequencies (unsupported: {_UNSUPPORTED_ROPE_TYPES})"
            )
    return rotary


def _find_attention_modules(model: nn.Module) -> list[nn.Module]:
    modules = [
        m
        for m in model.modules()
        if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx") and hasattr(m, "config")
    ]
    if not modules:
        raise ValueError(f"no attention modules with a layer_idx found in {type(model).__name__}")
    return modules


def _previous_implementation(modules: list[nn.Module]) -> str:
    names = {m.config._attn_implementation for m in modules}
    if len(names) != 1:
        raise ValueError(f"attention modules use different implementations {sorted(names)}; expected one")
    previous = names.pop()
    if previous.startswith(_IMPLEMENTATION_PREFIX):
        raise ValueError("model already runs a ReRoPE attention implementation but carries no patch state")
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if previous not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        raise ValueError(
            f"attention implementation {previous!r} registers no mask function; ReRoPE needs the attention mask"
        )
    return previous


def _register_implementation(previous: str) -> str:
    """Register (idempotently) the ReRoPE attention under a name tied to the previous backend's mask function."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = _IMPLEMENTATION_PREFIX + re.sub(r"[^0-9A-Za-z_]", "_", previous)
    AttentionInterface.register(name, rerope_attention_forward)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[previous])
    return name


def _previous_attention_function(module: nn.Module, previous: str) -> Callable[..., Any]:
    if previous == "eager":  # eager lives in each modeling file, not in the registry
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise ValueError(f"cannot find eager_attention_forward for {type(module).__name__}")
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[previous]


def _layer_state(
    module: nn.Module,
    ropes: dict[str, _Rope],
    rotary: nn.Module,
    settings: ReRoPESettings,
    previous: str,
    decoding: _DecodingState,
) -> _LayerState:
    layer_types = getattr(module.config, "layer_types", None)
    layer_type = layer_types[module.layer_idx] if layer_types else "full_attention"
    apply_rerope = layer_type == "full_attention"
    if apply_rerope and getattr(module, "sliding_window", None) is not None:
        raise ValueError(
            f"{type(module).__name__} {module.layer_idx} uses sliding-window attention without config.layer_types "
            "marking it; ReRoPE applies to full-attention layers"
        )
    if apply_rerope and getattr(module.config, "attn_logit_softcapping", None):
        raise ValueError("attention logit soft-capping is not supported by the ReRoPE attention")

    if layer_type not in ropes:
        takes_layer_type = "layer_type" in inspect.signature(rotary.forward).parameters
        ropes[layer_type] = _Rope(rotary, layer_type if takes_layer_type else None)
    rope = ropes[layer_type]
    identity_at_zero = _check_rotation_convention(module, rope)
    previous_fn = _previous_attention_function(module, previous)
    return _LayerState(settings, apply_rerope, rope, previous_fn, identity_at_zero, decoding, module.layer_idx)


def _check_rotation_convention(module: nn.Module, rope: _Rope) -> bool:
    """Refuse models whose rotation differs from the rotate-half layout ours uses; True if position 0 is identity."""
    reference = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
    if reference is None:
        raise ValueError(f"cannot verify the rotary convention of {type(module).__name__} (no apply_rotary_pos_emb)")
    param = next(iter(module.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else None
    generator = torch.Generator().manual_seed(0)
    positions = torch.arange(5, device=device).unsqueeze(0) * 3  # starts at 0
    probe = torch.empty(1, 1, 5, 1, dtype=dtype, device=device)
    cos, sin = rope(probe, positions)
    x = torch.randn(1, 2, 5, cos.shape[-1], generator=generator).to(dtype=dtype, device=device)
    expected, _ = reference(x, x, cos, sin)
    if not torch.equal(apply_rotary(x, cos, sin), expected):
        raise ValueError(f"{type(module).__name__} rotates q/k in a layout ReRoPE does not support (not rotate-half)")
    return bool((cos[:, :1] == 1).all() and (sin[:, :1] == 0).all())


# --------------------------------------------------------------------------------------------------------------------
# Hooks


def _unrotated_rotary_output(module: nn.Module, args: Any, output: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    cos, sin = output
    # the same read-only tensors for every step of a given shape (decoding asks for one token's again and again)
    key = (cos.shape, cos.dtype, cos.device, sin.shape, sin.dtype)
    cached = _IDENTITY_ROTATIONS.get(key)
    if cached is None:
        if len(_IDENTITY_ROTATIONS) >= 64:
            _IDENTITY_ROTATIONS.clear()
        cached = _IDENTITY_ROTATIONS[key] = (torch.ones_like(cos), torch.zeros_like(sin))
    return cached


_IDENTITY_ROTATIONS: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = {}


@functools.cache
def _cache_classes() -> tuple[type, type]:
    from transformers.cache_utils import DynamicLayer, StaticCache

    return DynamicLayer, StaticCache


def _before_forward(decoding: _DecodingState, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
    dynamic_layer, static_cache = _cache_classes()
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if isinstance(cache, static_cache):
        raise ValueError(
            "ReRoPE supports DynamicCache (the default) but not StaticCache: a static cache does not tell the "
            "attention where the cached tokens end"
        )
    decoding.cache, decoding.layers = None, None
    cache_layers = getattr(cache, "layers", None)
    if not isinstance(cache_layers, list):
        return
    decoding.cache, decoding.layers = cache, decoding.rotated.setdefault(cache, {})
    # the cache layers still hold the keys of before this step: check which rotated keys still match them
    for (layer_idx, _), rotated in decoding.layers.items():
        layer = cache_layers[layer_idx] if layer_idx < len(cache_layers) else None
        rotated.check(layer.keys if type(layer) is dynamic_layer else None)


def _after_forward(decoding: _DecodingState, module: nn.Module, args: Any, output: Any) -> None:
    decoding.cache, decoding.layers = None, None


# --------------------------------------------------------------------------------------------------------------------
# The attention function


def _key_validity(attention_mask: Tensor | None, batch: int, kv_len: int) -> Tensor | None:
    """``[B, kv]`` bool, False for padding keys, from any mask the previous backend builds; None if all valid."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"ReRoPE cannot read an attention mask of type {type(attention_mask).__name__}")
    if attention_mask.dim() == 2:  # flash-attention backends: the padding mask itself
        valid = attention_mask.bool()
    elif attention_mask.dim() == 4:
        allowed = attention_mask if attention_mask.dtype == torch.bool else _allowed_from_additive(attention_mask)
        valid = allowed.any(dim=(1, 2))
    else:
        raise ValueError(f"unexpected attention mask shape {tuple(attention_mask.shape)}")
    valid = valid[..., -kv_len:].expand(batch, kv_len)
    return None if bool(valid.all()) else valid


def _allowed_from_additive(mask: Tensor) -> Tensor:
    return mask > torch.finfo(mask.dtype).min / 2


def _check_causal_mask(attention_mask: Tensor | None, valid: Tensor | None, q_len: int, kv_len: int) -> None:
    """Refuse masks that are not "causal + key padding" (packed sequences, custom masks) for ReRoPE layers."""
    if attention_mask is None or attention_mask.dim() != 4:
        return
    allowed = attention_mask if attention_mask.dtype == torch.bool else _allowed_from_additive(attention_mask)
    allowed = allowed[:, 0, -q_len:, -kv_len:]
    i = torch.arange(kv_len - q_len, kv_len, device=allowed.device).unsqueeze(1)
    expected = torch.arange(kv_len, device=allowed.device).unsqueeze(0) <= i
    if valid is not None:
        expected = expected & valid.unsqueeze(1)
        query_valid = valid[:, -q_len:].unsqueeze(-1)
    else:
        query_valid = torch.ones(1, q_len, 1, dtype=torch.bool, device=allowed.device)
    if bool(((allowed != expected) & query_valid).any()):
        raise ValueError(
            "the attention mask of a ReRoPE layer is not a causal mask with padding (packed sequences or custom "
            "masks are not supported; use one sequence per row with padding)"
        )


def _check_contiguous(positions: Tensor, valid: Tensor | None) -> None:
    if positions.shape[1] < 2:
        return
    steps = positions[:, 1:] - positions[:, :-1]
    both = torch.ones_like(steps, dtype=torch.bool) if valid is None else valid[:, 1:] & valid[:, :-1]
    if bool(((steps != 1) & both).any()):
        raise ValueError(
            "position_ids must increase by 1 along each row for ReRoPE layers (packed sequences whose positions "
            "restart are not supported; use one sequence per row with padding)"
        )


def _valid_spans(valid: Tensor) -> list[tuple[int, int]]:
    """Per row, the contiguous ``[start, end)`` of valid keys; refuses padding in the middle of a row."""
    n = valid.shape[1]
    spans = []
    for row in valid:
        idx = torch.nonzero(row).flatten()
        if idx.numel() == 0:
            spans.append((0, 0))
            continue
        start, end = int(idx[0]), int(idx[-1]) + 1
        if end - start != idx.numel():
            raise ValueError("padding in the middle of a row is not supported by ReRoPE (pad on the left or right)")
        spans.append((start, min(end, n)))
    return spans


def rerope_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The attention function registered by :func:`patch_rerope` (transformers' AttentionInterface signature).

    Receives un-rotated ``query [B, H, q, D]``, ``key``/``value [B, Hkv, kv, D]`` (the whole cache) and returns
    ``([B, q, H, D], None)``.
    """
    state: _LayerState | None = getattr(module, _STATE_ATTRIBUTE, None)
    if state is None:
        raise ValueError(
            f"{type(module).__name__} runs the ReRoPE attention implementation but was not patched by patch_rerope "
            "(is its config shared with a patched model? give each model its own config)"
        )
    if state.apply_rerope:
        if dropout and module.training:
            raise ValueError("attention dropout is not supported by the ReRoPE attention; set attention_dropout=0")
        for unsupported in ("s_aux", "cu_seq_lens_q", "cu_seq_lens_k", "sliding_window", "softcap"):
            if kwargs.get(unsupported) is not None:
                raise ValueError(f"the ReRoPE attention does not support {unsupported!r} in its layers")
    tables = state.rope.tables(state, query, key.shape[2], kwargs.get("position_ids"), attention_mask)

    if not state.apply_rerope:
        q, k = apply_rotary(query, *tables.q), apply_rotary(key, *tables.k)
        return state.previous(module, q, k, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    q_len, kv_len = query.shape[2], key.shape[2]
    w = state.settings.window
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    start, end = near_far_ranges(q_len, kv_len, w)
    if q_len == 1:  # decoding: near and far query as two rows [B, H, 2, D], scaled (log-n and score scale)
        b, h, _, d = query.shape
        queries = torch.bmm(query.reshape(b, h, d), tables.query_rotation(scale)).view(b, h, 2, d)
        k_near = _decoding_keys(state, tables, key, "near", start, kv_len)
        k_far = key[:, :, :end] if tables.raw_far_keys else _decoding_keys(state, tables, key, "far", 0, end)
        out = two_part_attention_decode(queries, k_near, k_far, value, window=w, scale=1.0, key_valid=tables.valid,
                                        mask=tables.decode_mask)  # fmt: skip
        return out.transpose(1, 2), None

    if tables.log_n is not None:
        query = query * tables.log_n

    q_near = apply_rotary(query, *tables.q)
    if q_len == kv_len:
        # the far operands are rotated chunk by chunk inside the attention (no full rotated copies) when inferring
        q_far = Rotated(query, *tables.q_far)
        k_far = key if tables.k_far is None else Rotated(key, *tables.k_far)
        out = _prefill(q_near, apply_rotary(key, *tables.k), q_far, k_far, value, tables.valid, w, scale)
    else:  # a chunk continuing a cache
        k_near = apply_rotary(key[:, :, start:], *tables.k)
        k_far = key[:, :, :end] if tables.k_far is None else apply_rotary(key[:, :, :end], *tables.k_far)
        out = two_part_attention_dense(q_near, k_near, apply_rotary(query, *tables.q_far), k_far, value, window=w,
                                       scale=scale, key_valid=tables.valid)  # fmt: skip
    return out.transpose(1, 2), None


@dataclass
class _Tables:
    """Everything one forward pass needs that is the same for all layers of a layer type: cos/sin tables
    ``(cos, sin)`` for queries and keys (near and far), the log-n scale and the key padding."""

    q: tuple[Tensor, Tensor] | None  # (None when decoding: see rotations)
    k: tuple[Tensor, Tensor] | None  # all keys, except in ReRoPE layers: the near range only (None when decoding)
    q_far: tuple[Tensor, Tensor] | None = None
    k_far: tuple[Tensor, Tensor] | None = None  # the far range only; None: far keys stay raw (ReRoPE)
    log_n: Tensor | None = None  # [B, 1, q, 1]
    valid: Tensor | None = None  # [B, kv] bool, None when no key is padding
    decode_mask: tuple[Tensor | None, Tensor | None, Tensor | None] | None = None  # attention.decode_mask's
    # decoding: rotation matrices [B, 3, D, D] of the near query, the far query and the key that just became far
    # (the key that just became near sits at the query's position), cos/sin tables of other key ranges on demand
    rotations: Tensor | None = None
    block: _RotationBlock | None = None  # where the rotations come from: block.rotations[:, block_offset]
    block_offset: int = 0
    raw_far_keys: bool = False  # ReRoPE: far keys are used as cached
    kv_len: int = 0
    window: int = 0
    first_key_positions: tuple[int, ...] = ()  # per row, of cache key 0 (plain ints: compared every step)
    far_key_map: Callable[[Tensor], Tensor] | None = None  # key positions -> far key positions
    rope: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None
    _memo: dict[Any, Any] = field(default_factory=dict)

    def query_rotation(self, scale: float) -> Tensor:
        """``[B, D, 2D]``: ``query [B, H, D] @ it`` gives the near and far query rows side by side, times the
        score scale and the log-n scale (folded in once instead of scaling scores in every layer)."""
        return self.block.query_rotation(scale)[:, self.block_offset]

    def rotate_keys(self, key: Tensor, kind: str, start: int, end: int) -> Tensor:
        """Keys ``[start, end)`` of a decoding step rotated to their ``kind`` ("near" / "far") positions."""
        newest = self.kv_len if kind == "near" else self.kv_len - self.window
        if end - start == 1 and end == newest:
            if (kind,) not in self._memo:
                self._memo[kind,] = self.rotations[:, 0 if kind == "near" else 2]
            b, hkv, _, d = key.shape
            return torch.bmm(key[:, :, start], self._memo[kind,]).view(b, hkv, 1, d)
        if (kind, start, end) not in self._memo:
            first = torch.tensor(self.first_key_positions, device=key.device).unsqueeze(1)
            positions = first + torch.arange(start, end, device=key.device)
            self._memo[kind, start, end] = self.rope(positions if kind == "near" else self.far_key_map(positions))
        return apply_rotary(key[:, :, start:end], *self._memo[kind, start, end])


class _Rope:
    """The cos/sin of the model's rotary module for one layer type, and the tables of the forward pass in progress.

    Layers call :meth:`tables` with the ``position_ids`` / mask tensors the model hands to every layer; the first
    layer computes them, the others reuse them (the key holds those very tensor objects, weakly).
    """

    def __init__(self, rotary: nn.Module, layer_type: str | None):
        self.rotary, self.layer_type = rotary, layer_type
        self._cache: dict[bool, tuple[tuple[Any, ...], _Tables]] = {}
        self._block: _RotationBlock | None = None  # decoding rotations of upcoming positions, see _rotation_block

    def __call__(self, like: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        # .forward, not the module: the patch's hook on the module hides the real cos/sin from everyone else
        if self.layer_type is None:
            return self.rotary.forward(like, positions)
        return self.rotary.forward(like, positions, self.layer_type)

    def tables(self, state: _LayerState, query: Tensor, kv_len: int, position_ids, attention_mask) -> _Tables:
        batch, _, q_len, _ = query.shape
        key = (q_len, kv_len, batch, query.dtype, query.device)
        if position_ids is not None:
            key += (weakref.ref(position_ids), _version(position_ids))
            key += (None,) if attention_mask is None else (weakref.ref(attention_mask), _version(attention_mask))
            cached = self._cache.get(state.apply_rerope)
            if cached is not None and cached[0] == key:
                return cached[1]
        tables = self._build(state, query, kv_len, position_ids, attention_mask)
        if position_ids is not None:
            self._cache[state.apply_rerope] = (key, tables)
        return tables

    def _build(self, state: _LayerState, query: Tensor, kv_len: int, position_ids, attention_mask) -> _Tables:
        batch, _, q_len, _ = query.shape
        if position_ids is None:
            position_ids = torch.arange(kv_len - q_len, kv_len, device=query.device).unsqueeze(0)
        positions = position_ids.expand(batch, q_len)
        if not state.apply_rerope:
            # cached keys are the most recent kv_len tokens, ending at the last query
            key_positions = positions[:, -1:] - torch.arange(kv_len - 1, -1, -1, device=query.device)
            return _Tables(q=self(query, positions), k=self(query, key_positions))
        settings = state.settings
        valid = _key_validity(attention_mask, batch, kv_len)
        _check_causal_mask(attention_mask, valid, q_len, kv_len)
        _check_contiguous(positions, None if valid is None else valid[:, -q_len:])
        if settings.leaky is not None:
            far_key_map = functools.partial(far_key_positions, leaky=settings.leaky)
        elif not state.identity_at_zero:  # rope types that scale cos/sin scale the raw far keys too
            far_key_map = torch.zeros_like
        else:
            far_key_map = None
        if q_len == 1:
            tables = self._decoding_tables(query, kv_len, positions, settings, far_key_map)
            if query.device.type == "cpu" and query.dtype not in (torch.float32, torch.float64):  # kernel path
                tables.decode_mask = decode_mask(kv_len, max(0, kv_len - settings.window), valid, query.dtype)
        else:
            far_queries = far_query_positions(positions, settings.window, settings.leaky)
            key_positions = positions[:, -1:] - torch.arange(kv_len - 1, -1, -1, device=query.device)
            start, end = (0, kv_len) if q_len == kv_len else near_far_ranges(q_len, kv_len, settings.window)
            # keys before `start` are far from every query and keys from `end` on are near to every query
            tables = _Tables(q=self(query, positions), k=self(query, key_positions[:, start:]))
            tables.q_far = self(query, far_queries)
            tables.k_far = None if far_key_map is None else self(query, far_key_map(key_positions[:, :end]))
        tables.valid = valid
        if settings.log_scale_base is not None and q_len > 1:  # (decoding folds it into the query rotation)
            tables.log_n = log_n_scale(positions, settings.log_scale_base).to(query.dtype)[:, None, :, None]
        return tables

    def _decoding_tables(self, query, kv_len: int, positions, settings: ReRoPESettings, far_key_map) -> _Tables:
        """The rows a decoding step rotates (near query, far query, newest far key) as matrices; the few other keys
        it may need get tables on demand."""
        values = positions.view(-1).tolist()
        block, offset = self._rotation_block(query, positions, values, settings, far_key_map)
        tables = _Tables(q=None, k=None, raw_far_keys=far_key_map is None, kv_len=kv_len, window=settings.window)
        tables.block, tables.block_offset, tables.rotations = block, offset, block.rotations[:, offset]
        tables.first_key_positions = tuple(v - (kv_len - 1) for v in values)
        tables.far_key_map, tables.rope = far_key_map, functools.partial(self, query)
        return tables

    def _rotation_block(self, like: Tensor, positions: Tensor, values: list[int], settings: ReRoPESettings,
                        far_key_map) -> tuple[_RotationBlock, int]:  # fmt: skip
        """The block holding this step's rotation matrices and the offset of the step in it. Blocks are made for as
        many upcoming positions as fit in ``_ROTATION_BLOCK_BYTES`` (a rotary call and the matrices per step cost
        more than the attention arithmetic of a small model) and tied to the rotary module's buffers (address and
        version counter: moving or editing them makes a new block)."""
        buffers = tuple((b.data_ptr(), _version(b)) for b in self.rotary._buffers.values() if b is not None)
        key = (like.dtype, like.device, like.shape[-1], far_key_map is None, buffers)
        block = self._block
        if block is not None and block.key == key and len(values) == len(block.starts):
            offset = values[0] - block.starts[0]
            if 0 <= offset < block.rotations.shape[1] and all(v - s == offset for v, s in zip(values, block.starts)):
                return block, offset
        d = like.shape[-1]
        count = max(1, _ROTATION_BLOCK_BYTES // (len(values) * 3 * d * d * like.element_size()))
        upcoming = (positions + torch.arange(count, device=positions.device)).reshape(-1, 1)
        cos, sin = self(like, _decoding_row_positions(upcoming, settings, far_key_map))
        rotations = rotation_matrices(cos, sin, d).view(len(values), count, 3, d, d)
        log_n = None
        if settings.log_scale_base is not None:
            log_n = log_n_scale(upcoming.view(len(values), count), settings.log_scale_base).to(like.dtype)
        self._block = _RotationBlock(key, tuple(values), rotations, log_n)
        return self._block, 0


_ROTATION_BLOCK_BYTES = 1 << 20


class _RotationBlock:
    """Rotation matrices ``[B, P, 3, D, D]`` of the decoding rows (near query, far query, newest far key) for ``P``
    consecutive positions from ``starts`` (per row), and the log-n query scales ``[B, P]``."""

    def __init__(self, key: tuple[Any, ...], starts: tuple[int, ...], rotations: Tensor, log_n: Tensor | None):
        self.key, self.starts, self.rotations, self.log_n = key, starts, rotations, log_n
        self._queries: dict[float, Tensor] = {}

    def query_rotation(self, scale: float) -> Tensor:
        """``[B, P, D, 2D]``: near and far query rotations side by side, times ``scale`` and the log-n scale."""
        if scale not in self._queries:
            rows = self.rotations[:, :, :2] * scale
            if self.log_n is not None:
                rows = rows * self.log_n[:, :, None, None, None]
            self._queries[scale] = torch.cat([rows[:, :, 0], rows[:, :, 1]], dim=-1)
        return self._queries[scale]


def _decoding_row_positions(positions: Tensor, settings: ReRoPESettings, far_key_map) -> Tensor:
    """``[B, 3]`` positions of a decoding step's rows for query positions ``[B, 1]``: near query (and newest near
    key), far query, and the newest far key, which sits ``window`` before the query (a placeholder row when far keys
    stay raw)."""
    far_queries = far_query_positions(positions, settings.window, settings.leaky)
    newest_far = far_queries if far_key_map is None else far_key_map(positions - settings.window).to(far_queries.dtype)
    return torch.cat([positions.to(far_queries.dtype), far_queries, newest_far], dim=1)


def _decoding_keys(state: _LayerState, tables: _Tables, key: Tensor, kind: str, start: int, end: int) -> Tensor:
    """Keys ``[start, end)`` of a decoding step rotated to their ``kind`` ("near" / "far") positions, reusing earlier
    steps' rotations (:class:`_RotatedKeys`) when the forward pass got its cache by keyword."""
    per_layer = state.decoding.layers
    if per_layer is None or end == start or key.requires_grad:
        return tables.rotate_keys(key, kind, start, end)
    rotated = per_layer.get((state.layer_idx, kind))
    if rotated is None or rotated.state is not state:
        rotated = per_layer[state.layer_idx, kind] = _RotatedKeys(state)
    return rotated.update(key, start, end, tables, kind)


class _RotatedKeys:
    """One layer's cached keys rotated to their near (RoPE ``j``) or far (Leaky ReRoPE ``j / k``) positions, kept
    across decoding steps.

    Those positions do not depend on the query, so a key rotated once stays valid while the cache holds the same raw
    key at the same position: each step then rotates only the key that became near / far, instead of all ``w`` near
    keys (and, for Leaky ReRoPE, all far keys) of every layer, which dominated decoding time. Validity is checked,
    never assumed: before a forward pass (:meth:`check`) the cache layer's keys must be the tensor the rotations were
    made from, or a view of its first tokens (``crop``), with the storage unwritten since (same version counter);
    during the step (:meth:`update`) the cache must have grown by the one new key and its first key must sit at the
    same position. Anything else (beam reordering, ``reset``, other cache types, a forward of the inner model
    without the hooks) rotates from scratch.
    """

    def __init__(self, state: _LayerState):
        self.state = state
        self.source: Tensor | None = None  # the cache's keys after the step that made the rotations
        self.version = -1
        self.first_position: tuple[int, ...] = ()
        self.buffer: Tensor | None = None  # [B, Hkv, capacity, D]: keys [offset, offset + length) rotated
        self.offset = self.length = 0
        self.reusable, self.cached_length = 0, -1  # set by check() for the forward pass in progress

    def check(self, keys: Tensor | None) -> None:
        """Before a forward pass: up to which key the rotations still match the (not yet updated) keys of the cache
        layer (None: not a ``DynamicLayer``)."""
        self.reusable, self.cached_length = 0, -1
        source = self.source
        if keys is None or source is None or _version(source) != self.version or not _is_prefix_view(keys, source):
            return
        self.reusable, self.cached_length = min(self.offset + self.length, keys.shape[2]), keys.shape[2]

    def update(self, key: Tensor, start: int, end: int, tables: _Tables, kind: str) -> Tensor:
        """The rotated keys ``[start, end)`` of ``key`` (the updated cache), rotating only those not kept."""
        first = tables.first_key_positions
        grew_by_one = key.shape[2] == self.cached_length + 1 and first == self.first_position
        kept_end = self.reusable if grew_by_one and self.offset <= start < self.reusable else start
        kept_end = min(kept_end, end)
        if end - self.offset > (0 if self.buffer is None else self.buffer.shape[2]) or kept_end == start:
            # (re)allocate with room to append for a while; keys before `start` are no longer needed
            size = end - start
            buffer = key.new_empty(*key.shape[:2], size + size // 4 + 64, key.shape[3])
            if kept_end > start:
                buffer[:, :, : kept_end - start] = self.buffer[:, :, start - self.offset : kept_end - self.offset]
            self.buffer, self.offset = buffer, start
        if end > kept_end:
            self.buffer[:, :, kept_end - self.offset : end - self.offset] = tables.rotate_keys(key, kind, kept_end, end)
        self.source, self.version, self.first_position = key, _version(key), first
        self.length, self.reusable, self.cached_length = end - self.offset, 0, -1
        return self.buffer[:, :, start - self.offset : end - self.offset]


def _version(tensor: Tensor) -> int | None:
    """The version counter, bumped by in-place writes; tensors made under ``torch.inference_mode`` have none (None:
    their in-place writes go unseen, which transformers' caches and masks never do)."""
    return None if tensor.is_inference() else tensor._version


def _is_prefix_view(keys: Tensor, source: Tensor) -> bool:
    """True if ``keys`` is ``source`` or a view of its first tokens (what ``DynamicCache.crop`` leaves behind)."""
    if keys is source:
        return True
    # a view of `source` (so sharing its version counter) starting at the same address with the same strides
    ks, ss = keys.shape, source.shape
    return (
        isinstance(keys, torch.Tensor)
        and keys._base is source
        and keys.dtype == source.dtype
        and keys.data_ptr() == source.data_ptr()
        and keys.stride() == source.stride()
        and len(ks) == 4
        and (ks[0], ks[1], ks[3]) == (ss[0], ss[1], ss[3])
        and ks[2] <= ss[2]
    )


def _prefill(q_near, k_near, q_far, k_far, value, valid: Tensor | None, window: int, scale: float) -> Tensor:
    if valid is None:
        return two_part_attention(q_near, k_near, q_far, k_far, value, window=window, scale=scale)
    q_far, k_far = (x.materialize() if isinstance(x, Rotated) else x for x in (q_far, k_far))
    # padded rows: run each row on its own valid span (positions inside a span are contiguous), zeros elsewhere
    rows = []
    for b, (start, end) in enumerate(_valid_spans(valid)):
        row = torch.zeros_like(q_near[b : b + 1, :, :, : value.shape[-1]])
        if end > start:
            span = slice(start, end)
            part = two_part_attention(
                q_near[b : b + 1, :, span], k_near[b : b + 1, :, span], q_far[b : b + 1, :, span],
                k_far[b : b + 1, :, span], value[b : b + 1, :, span], window=window, scale=scale,
            )  # fmt: skip
            row = torch.cat([row[:, :, :start], part, row[:, :, end:]], dim=2)
        rows.append(row)
    return torch.cat(rows, dim=0)
