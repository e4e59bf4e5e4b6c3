"""Two-part attention: a near (windowed) part and a far part, merged exactly by their log-sum-exps.

ReRoPE-style attentions score a query ``i`` against a key ``j`` with one pair of rotated vectors when ``i - j < w``
(the *near* part: ordinary RoPE) and another pair when ``i - j >= w`` (the *far* part). Each part is an ordinary
softmax attention over a subset of keys, so the exact result is

    out = (e^{lse_near} o_near + e^{lse_far} o_far) / (e^{lse_near} + e^{lse_far})

with ``lse`` each part's log-sum-exp of scores. For a prefill of ``n`` tokens the near part is a sliding-window causal
attention and the far part is a plain causal attention of ``q_far[w:]`` over ``k_far[:n-w]``, so the total work is
about one causal attention and memory stays O(n) (the reference implementation materialises two n x n matrices).
Both parts run in chunks whose outputs are merged into one output buffer as they come.

Kernels returning the log-sum-exp:

* CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward op;
* CUDA with flash-attn: ``flash_attn_func(..., window_size=(w - 1, 0), return_attn_probs=True)`` (inference);
* anywhere else (and for training on CUDA): an explicit "math" kernel, whose scores for one chunk of far rows at a
  time take O(n * FAR_CHUNK) memory.

Training uses :class:`_TwoPartAttention`, whose backward runs each part's backward kernel with the *merged* output and
log-sum-exp (as ring attention does); that gives the exact gradient of the merged attention.

Tensors are ``[batch, heads, tokens, head_dim]``; keys and values may have fewer heads than queries (grouped-query
attention) as long as the query heads are a multiple of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..capabilities import flash_attn_available
from .positions import apply_rotary

Tensor = torch.Tensor


@dataclass(frozen=True)
class Rotated:
    """``x [B, H, n, D]`` rotated by ``cos``/``sin`` (``[B, n, R]`` or ``[n, R]``, see
    :func:`~hf_su.modeling.positions.apply_rotary`), rotated only where and when used.

    Passed as the far queries or keys of :func:`two_part_attention`, an inference prefill rotates them one chunk at a
    time, so it never holds a full rotated copy next to the near-part ones (for Leaky ReRoPE that is two q/k-sized
    tensors less at the peak). Keys are rotated once per far chunk of queries that sees them (a few times each at
    most): O(n) work next to the O(n^2) attention.
    """

    x: Tensor
    cos: Tensor
    sin: Tensor

    @property
    def shape(self) -> torch.Size:
        return self.x.shape

    def rows(self, start: int, end: int, out: Tensor | None = None) -> Tensor:
        """The rotated tokens ``[start, end)`` (written into ``out`` if given)."""
        cos, sin = self.cos[..., start:end, :], self.sin[..., start:end, :]
        return apply_rotary(self.x[:, :, start:end], cos, sin, out=out)

    def materialize(self) -> Tensor:
        """All tokens rotated (what autograd and the flash-attn path take)."""
        return apply_rotary(self.x, self.cos, self.sin)


def _materialize(x: Tensor | Rotated) -> Tensor:
    return x.materialize() if isinstance(x, Rotated) else x


def merge_attention_parts(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two attentions over disjoint key sets into the attention over their union, **in place** in ``out_a``,
    ``lse_a`` (``out_b`` is overwritten too: it serves as scratch space).

    Args:
        out_a: ``[B, H, n, D]`` output of the first part.
        lse_a: ``[B, H, n]`` log-sum-exp of the first part's (scaled) scores; ``-inf`` for rows that saw no key.
        out_b: Output of the second part (same shape); rows with ``lse_b == -inf`` must be finite (e.g. zero).
        lse_b: Log-sum-exp of the second part.

    Returns:
        ``(out_a, lse_a)`` holding the merged output and log-sum-exp.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    # a row that saw no key in either part has lse = -inf; give it weight 0 instead of NaN
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    out_a.mul_(torch.exp(lse_a - safe).unsqueeze(-1))
    out_a.add_(out_b.mul_(torch.exp(lse_b - safe).unsqueeze(-1)))
    lse_a.copy_(lse)
    return out_a, lse_a


# --------------------------------------------------------------------------------------------------------------------
# Kernels: (q, k, v, causal, additive mask, scale) -> (out, lse) and the matching backward given out and lse.


@dataclass(frozen=True)
class _Kernel:
    name: str
    forward: Callable[..., tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]


def _cpu_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Tensor | None, scale: float):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)


def _cpu_backward(dout, q, k, v, out, lse, causal: bool, mask: Tensor | None, scale: float):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale
    )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _math_scores(q: Tensor, k: Tensor, causal: bool, mask: Tensor | None, scale: float) -> Tensor:
    """Scaled, masked scores ``[B, Hkv, groups, nq, nk]`` in the compute dtype."""
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    dt = _compute_dtype(q.dtype)
    qg = q.reshape(b, hkv, h // hkv, nq, d).to(dt)
    s = torch.matmul(qg, k.to(dt).unsqueeze(2).transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(nq, nk, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    if mask is not None:
        s = s + mask.to(dt)
    return s


def _math_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Tensor | None, scale: float):
    b, h, nq, d = q.shape
    s = _math_scores(q, k, causal, mask, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    out = torch.matmul(p, v.to(s.dtype).unsqueeze(2))
    return out.reshape(b, h, nq, v.shape[-1]).to(q.dtype), lse.reshape(b, h, nq)


def _math_backward(dout, q, k, v, out, lse, causal: bool, mask: Tensor | None, scale: float):
    b, h, nq, d = q.shape
    hkv = k.shape[1]
    s = _math_scores(q, k, causal, mask, scale)
    dt = s.dtype
    p = torch.exp(s - lse.reshape(b, hkv, h // hkv, nq, 1).to(dt))
    do = dout.reshape(b, hkv, h // hkv, nq, -1).to(dt)
    dv = torch.matmul(p.transpose(-1, -2), do).sum(2)
    dp = torch.matmul(do, v.to(dt).unsqueeze(2).transpose(-1, -2))
    delta = (do * out.reshape(b, hkv, h // hkv, nq, -1).to(dt)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, k.to(dt).unsqueeze(2)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.reshape(b, hkv, h // hkv, nq, d).to(dt)).sum(2) * scale
    return dq.reshape(b, h, nq, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


CPU_KERNEL = _Kernel("cpu", _cpu_forward, _cpu_backward)
MATH_KERNEL = _Kernel("math", _math_forward, _math_backward)


# --------------------------------------------------------------------------------------------------------------------
# Near part as a banded attention. After the first window (plain causal), query block b of c <= w queries
# [w + b c, w + (b+1) c) sees the c + w keys [b c, w + (b+1) c) under one shared c x (c + w) band mask. Blocks and
# bands are strided *views* (bands overlap), so one kernel call per batch row covers all full blocks without copying
# q, k or v. The band computes c + w scores per query for the w it needs: smaller c wastes less, larger c gives the
# kernel bigger tiles. Forward and backward may partition the near pairs differently (each backward only needs the
# merged out / lse): on CPU (w = 512, torch 2.13) c = 64 was fastest forward and c = 256 backward.

NEAR_BLOCK = 64
NEAR_BLOCK_BACKWARD = 256
NEAR_GROUP_QUERIES = 2048


def _block_size(window: int, preferred: int) -> int:
    return max(1, min(window, preferred, -(-window // 2)))


def _band_mask(block: int, window: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    t = torch.arange(block, device=device).unsqueeze(1)
    u = torch.arange(block + window, device=device).unsqueeze(0)
    allowed = (u > t) & (u <= t + window)
    return torch.zeros(block, block + window, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))


def _blocks(x: Tensor, row: int, start: int, count: int, length: int, step: int) -> Tensor:
    """View ``[count, H, length, ...]`` of batch row ``row`` of ``x [B, H, n, ...]``: block i holds tokens
    ``[start + i * step, start + i * step + length)`` (overlapping when ``length > step``)."""
    stride_b, stride_h, stride_n = x.stride()[:3]
    return x.as_strided(
        (count, x.shape[1], length, *x.shape[3:]),
        (step * stride_n, stride_h, stride_n, *x.stride()[3:]),
        x.storage_offset() + row * stride_b + start * stride_n,
    )


def _block_groups(batch: int, full: int, block: int) -> list[tuple[int, int, int]]:
    """``(row, first block, block count)`` per kernel call: about NEAR_GROUP_QUERIES queries per call bounds the
    kernel's temporary outputs (and, in backward, the band gradients, (c + w) / c times the keys they cover)."""
    per_call = max(1, NEAR_GROUP_QUERIES // block)
    return [(row, first, min(per_call, full - first)) for row in range(batch) for first in range(0, full, per_call)]


def _near_layout(n: int, window: int, block: int) -> tuple[int, int]:
    """Number of full query blocks after the first window, and where the remaining partial block starts."""
    full = (n - window) // block
    return full, window + full * block


def _near_forward(kernel: _Kernel, q: Tensor, k: Tensor, v: Tensor, window: int, scale: float):
    b, h, n, _ = q.shape
    w, c = window, _block_size(window, NEAR_BLOCK)
    out0, lse0 = kernel.forward(q[:, :, :w], k[:, :, :w], v[:, :, :w], True, None, scale)
    if n <= w:
        return out0, lse0
    out = torch.empty(b, n, h, v.shape[-1], dtype=out0.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(b, h, n, dtype=lse0.dtype, device=q.device)
    out[:, :, :w], lse[:, :, :w] = out0, lse0
    mask = _band_mask(c, w, q.dtype, q.device)
    full, tail = _near_layout(n, w, c)
    for row, first, count in _block_groups(b, full, c):
        start = w + first * c
        o, o_lse = kernel.forward(
            _blocks(q, row, start, count, c, c), _blocks(k, row, start - w, count, c + w, c),
            _blocks(v, row, start - w, count, c + w, c), False, mask, scale,
        )  # fmt: skip
        _blocks(out, row, start, count, c, c).copy_(o)
        _blocks(lse, row, start, count, c, c).copy_(o_lse)
    if tail < n:
        m = n - tail
        o, o_lse = kernel.forward(
            q[:, :, tail:], k[:, :, tail - w :], v[:, :, tail - w :], False, mask[:m, : m + w], scale
        )
        out[:, :, tail:], lse[:, :, tail:] = o, o_lse
    return out, lse


def _near_backward(kernel: _Kernel, dout, q, k, v, out, lse, window: int, scale: float):
    b, _, n, _ = q.shape
    w, c = window, _block_size(window, NEAR_BLOCK_BACKWARD)
    dq0, dk0, dv0 = kernel.backward(
        dout[:, :, :w], q[:, :, :w], k[:, :, :w], v[:, :, :w], out[:, :, :w], lse[:, :, :w], True, None, scale
    )
    if n <= w:
        return dq0, dk0, dv0
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dq[:, :, :w], dk[:, :, :w], dv[:, :, :w] = dq0, dk0, dv0
    mask = _band_mask(c, w, q.dtype, q.device)
    full, tail = _near_layout(n, w, c)
    for row, first, count in _block_groups(b, full, c):
        start = w + first * c
        gq, gk, gv = kernel.backward(
            _blocks(dout, row, start, count, c, c), _blocks(q, row, start, count, c, c),
            _blocks(k, row, start - w, count, c + w, c), _blocks(v, row, start - w, count, c + w, c),
            _blocks(out, row, start, count, c, c), _blocks(lse, row, start, count, c, c), False, mask, scale,
        )  # fmt: skip
        _blocks(dq, row, start, count, c, c).copy_(gq)
        # bands overlap: add their gradients back slice by slice (c keys at a time, non-overlapping views)
        for grad, band in ((dk, gk), (dv, gv)):
            for offset in range(0, c + w, c):
                size = min(c, c + w - offset)
                _blocks(grad, row, start - w + offset, count, size, c).add_(band[:, :, offset : offset + size])
    if tail < n:
        m = n - tail
        gq, gk, gv = kernel.backward(
            dout[:, :, tail:], q[:, :, tail:], k[:, :, tail - w :], v[:, :, tail - w :], out[:, :, tail:],
            lse[:, :, tail:], False, mask[:m, : m + w], scale,
        )  # fmt: skip
        dq[:, :, tail:] = gq
        dk[:, :, tail - w :] += gk
        dv[:, :, tail - w :] += gv
    return dq, dk, dv


# Far part: query i >= w sees keys j <= i - w, i.e. far row t = i - w is causal over keys [0, t]. It runs in chunks of
# FAR_CHUNK rows [s, e): keys [s, e) as a causal square plus keys [0, s) fully visible, so the kernel's temporary
# output stays chunk-sized and is merged into the near output right away (peak memory ~ one extra q-sized tensor).

FAR_CHUNK = 4096


def _far_chunks(m: int) -> list[tuple[int, int]]:
    return [(s, min(s + FAR_CHUNK, m)) for s in range(0, m, FAR_CHUNK)]


def _row_reader(x: Tensor | Rotated, size: int) -> Callable[[int, int], Tensor]:
    """Tokens ``[start, end)`` of ``x``: views of a tensor, or, for a :class:`Rotated`, rotated into one buffer of
    ``size`` tokens reused from chunk to chunk (fewer, steadier allocations: a lower memory peak)."""
    if isinstance(x, Tensor):
        return lambda start, end: x[:, :, start:end]
    buffer = x.x.new_empty(*x.x.shape[:2], size, x.x.shape[3])
    return lambda start, end: x.rows(start, end, out=buffer[:, :, : end - start])


def _two_part_forward(kernel: _Kernel, q_near, k_near, q_far, k_far, v, window: int, scale: float):
    n, w = q_near.shape[2], window
    out, lse = _near_forward(kernel, q_near, k_near, v, w, scale)
    if n <= w:
        return out, lse
    q_rows, k_rows = _row_reader(q_far, min(FAR_CHUNK, n - w)), _row_reader(k_far, min(FAR_CHUNK, n - w))
    for s, e in _far_chunks(n - w):
        rows = q_rows(w + s, w + e)
        part, part_lse = kernel.forward(rows, k_rows(s, e), v[:, :, s:e], True, None, scale)
        # the fully visible keys [0, s): one call on a tensor, chunk by chunk when they are rotated on the fly
        for a, b in [(0, s)] if s and isinstance(k_far, Tensor) else _far_chunks(s):
            merge_attention_parts(part, part_lse, *kernel.forward(rows, k_rows(a, b), v[:, :, a:b], False, None, scale))
        merge_attention_parts(out[:, :, w + s : w + e], lse[:, :, w + s : w + e], part, part_lse)
    return out, lse


class _TwoPartAttention(torch.autograd.Function):
    """Prefill two-part attention with an exact backward (each part's backward with the merged out / lse)."""

    @staticmethod
    def forward(ctx, q_near, k_near, q_far, k_far, v, window: int, scale: float, kernel: _Kernel):
        out, lse = _two_part_forward(kernel, q_near, k_near, q_far, k_far, v, window, scale)
        ctx.save_for_backward(q_near, k_near, q_far, k_far, v, out, lse)
        ctx.window, ctx.scale, ctx.kernel = window, scale, kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        q_near, k_near, q_far, k_far, v, out, lse = ctx.saved_tensors
        w, scale, kernel = ctx.window, ctx.scale, ctx.kernel
        n = q_near.shape[2]
        dout = dout.contiguous()
        dq_near, dk_near, dv = _near_backward(kernel, dout, q_near, k_near, v, out, lse, w, scale)
        dq_far, dk_far = torch.zeros_like(q_far), torch.zeros_like(k_far)
        for s, e in _far_chunks(n - w):
            rows = slice(w + s, w + e)
            args = (dout[:, :, rows], q_far[:, :, rows])
            merged = (out[:, :, rows], lse[:, :, rows])
            gq, gk, gv = kernel.backward(*args, k_far[:, :, s:e], v[:, :, s:e], *merged, True, None, scale)
            dq_far[:, :, rows] = gq
            dk_far[:, :, s:e] += gk
            dv[:, :, s:e] += gv
            if s:
                gq, gk, gv = kernel.backward(*args, k_far[:, :, :s], v[:, :, :s], *merged, False, None, scale)
                dq_far[:, :, rows] += gq
                dk_far[:, :, :s] += gk
                dv[:, :, :s] += gv
        return dq_near, dk_near, dq_far, dk_far, dv, None, None, None


def _flash_two_part_forward(q_near, k_near, q_far, k_far, v, window: int, scale: float) -> Tensor:
    """The same two parts on flash-attn CUDA kernels (sliding window + bottom-right causal), inference only."""
    from flash_attn import flash_attn_func

    def to_flash(x: Tensor) -> Tensor:
        return x.transpose(1, 2)  # [B, n, H, D] views: flash-attn wants the head dimension contiguous only

    n = q_near.shape[2]
    out, lse, _ = flash_attn_func(
        to_flash(q_near), to_flash(k_near), to_flash(v), softmax_scale=scale, causal=True,
        window_size=(window - 1, 0), return_attn_probs=True,
    )  # fmt: skip
    out = out.transpose(1, 2)
    if n <= window:
        return out
    m = n - window
    out_far, lse_far, _ = flash_attn_func(
        to_flash(q_far[:, :, window:]), to_flash(k_far[:, :, :m]), to_flash(v[:, :, :m]), softmax_scale=scale,
        causal=True, return_attn_probs=True,
    )  # fmt: skip
    merge_attention_parts(out[:, :, window:], lse[:, :, window:], out_far.transpose(1, 2), lse_far)
    return out


def _check_shapes(q_near: Tensor, k_near: Tensor, q_far: Tensor | Rotated, k_far: Tensor | Rotated, v: Tensor) -> None:
    if q_near.dim() != 4 or q_near.shape != q_far.shape:
        raise ValueError(
            f"queries must be [B, H, n, D] of equal shapes, got {tuple(q_near.shape)}, {tuple(q_far.shape)}"
        )
    if k_near.shape != k_far.shape or k_near.shape[:3] != v.shape[:3]:
        raise ValueError(f"keys/values shapes disagree: {tuple(k_near.shape)}, {tuple(k_far.shape)}, {tuple(v.shape)}")
    if q_near.shape[1] % k_near.shape[1]:
        raise ValueError(f"{q_near.shape[1]} query heads are not a multiple of {k_near.shape[1]} key heads")


def two_part_attention(
    q_near: Tensor,
    k_near: Tensor,
    q_far: Tensor | Rotated,
    k_far: Tensor | Rotated,
    v: Tensor,
    *,
    window: int,
    scale: float,
    kernel: str | None = None,
) -> Tensor:
    """Causal attention of ``n`` queries over the same ``n`` keys where near and far keys use different q/k pairs.

    Query ``i`` scores key ``j <= i`` as ``q_near[i] . k_near[j]`` when ``i - j < window`` and as
    ``q_far[i] . k_far[j]`` otherwise (times ``scale``); one softmax over all keys. Differentiable.

    Args:
        q_near: ``[B, H, n, D]`` queries for the near part.
        k_near: ``[B, Hkv, n, D]`` keys for the near part.
        q_far: Queries for the far part (same shape as ``q_near``); a :class:`Rotated` is rotated chunk by chunk
            when no gradient is needed (less memory), else in full.
        k_far: Keys for the far part (same shape as ``k_near``); may be :class:`Rotated` too.
        v: ``[B, Hkv, n, Dv]`` values.
        window: The window ``w >= 1``.
        scale: Score scale (usually ``D ** -0.5``).
        kernel: ``None`` picks flash-attn (CUDA, fp16/bf16, no gradient needed), the CPU flash kernel on CPU, else
            the math kernel; ``"cpu"`` or ``"math"`` force one.

    Returns:
        ``[B, H, n, Dv]`` attention output.
    """
    _check_shapes(q_near, k_near, q_far, k_far, v)
    kernels = {"cpu": CPU_KERNEL, "math": MATH_KERNEL}
    if kernel is not None and kernel not in kernels:
        raise ValueError(f"kernel must be None, 'cpu' or 'math', got {kernel!r}")
    tensors = [q_near, k_near, v] + [t.x if isinstance(t, Rotated) else t for t in (q_far, k_far)]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if kernel is None:
        if (
            q_near.is_cuda
            and q_near.dtype in (torch.float16, torch.bfloat16)
            and not needs_grad
            and flash_attn_available()
        ):
            return _flash_two_part_forward(q_near, k_near, _materialize(q_far), _materialize(k_far), v, window, scale)
        kernel = "cpu" if q_near.device.type == "cpu" else "math"
    if not needs_grad:
        return _two_part_forward(kernels[kernel], q_near, k_near, q_far, k_far, v, window, scale)[0]
    q_far, k_far = _materialize(q_far), _materialize(k_far)
    return _TwoPartAttention.apply(q_near, k_near, q_far, k_far, v, window, scale, kernels[kernel])


def near_far_ranges(q_len: int, kv_len: int, window: int) -> tuple[int, int]:
    """Key ranges the last ``q_len`` queries of a ``kv_len`` sequence need: near keys ``[start, kv_len)``, far keys
    ``[0, end)``."""
    return max(0, kv_len - q_len - window + 1), max(0, kv_len - window)


def two_part_attention_dense(
    q_near: Tensor,
    k_near: Tensor,
    q_far: Tensor,
    k_far: Tensor,
    v: Tensor,
    *,
    window: int,
    scale: float,
    key_valid: Tensor | None = None,
) -> Tensor:
    """Two-part attention for queries that continue a cached sequence (decoding, chunked prefill), one softmax.

    The ``q`` queries are the last ones of a ``kv``-token sequence (query ``t`` sits at index ``kv - q + t``).
    ``k_near`` holds keys ``[start, kv)`` and ``k_far`` keys ``[0, end)`` with ``(start, end)`` from
    :func:`near_far_ranges`. Scores are explicit (``[q, kv]`` per head), which is cheap for the short query blocks
    this serves; differentiable through autograd.

    Args:
        q_near: ``[B, H, q, D]`` queries for near keys.
        k_near: ``[B, Hkv, kv - start, D]`` near-range keys.
        q_far: ``[B, H, q, D]`` queries for far keys.
        k_far: ``[B, Hkv, end, D]`` far-range keys.
        v: ``[B, Hkv, kv, Dv]`` all values.
        window: The window ``w``.
        scale: Score scale.
        key_valid: Optional ``[B, kv]`` bool, False for padding keys.

    Returns:
        ``[B, H, q, Dv]``.
    """
    b, h, q_len, _ = q_near.shape
    kv = v.shape[2]
    start, end = near_far_ranges(q_len, kv, window)
    if k_near.shape[2] != kv - start or k_far.shape[2] != end:
        raise ValueError(
            f"near/far keys must cover [{start}, {kv}) and [0, {end}), got {k_near.shape[2]}, {k_far.shape[2]}"
        )
    hkv = v.shape[1]
    dt = _compute_dtype(q_near.dtype)
    i = torch.arange(kv - q_len, kv, device=v.device).unsqueeze(1)
    j_near = torch.arange(start, kv, device=v.device).unsqueeze(0)
    j_far = torch.arange(0, end, device=v.device).unsqueeze(0)
    allowed = torch.cat([(j_near <= i) & (j_near > i - window), j_far <= i - window], dim=1)  # [q, keys]
    allowed = allowed.view(1, 1, 1, q_len, -1)
    if key_valid is not None:
        valid = torch.cat([key_valid[:, start:], key_valid[:, :end]], dim=1)
        allowed = allowed & valid.view(b, 1, 1, 1, -1)

    def scores(q: Tensor, k: Tensor) -> Tensor:
        return torch.matmul(q.reshape(b, hkv, h // hkv, q_len, -1), k.unsqueeze(2).transpose(-1, -2))

    s = torch.cat([scores(q_near, k_near), scores(q_far, k_far)], dim=-1).to(dt) * scale
    # finite fill: a padding query that sees no key gets a harmless uniform row instead of NaN
    s = s.masked_fill(~allowed, torch.finfo(dt).min)
    p = torch.softmax(s, dim=-1).to(v.dtype)
    n_near = kv - start
    out = torch.matmul(p[..., :n_near], v[:, :, start:].unsqueeze(2))
    if end:
        out = out + torch.matmul(p[..., n_near:], v[:, :, :end].unsqueeze(2))
    return out.reshape(b, h, q_len, -1)


def two_part_attention_decode(
    queries: Tensor,
    k_near: Tensor,
    k_far: Tensor,
    v: Tensor,
    *,
    window: int,
    scale: float,
    key_valid: Tensor | None = None,
    mask: tuple[Tensor | None, Tensor | None, Tensor | None] | None = None,
) -> Tensor:
    """One new query (decoding) against a ``kv``-token cache, without copying the cache.

    ``queries [B, H, 2, D]`` holds the near query (row 0) and the far query (row 1) of the one new token; the near row
    attends over ``k_near`` (the last keys, rotated), the far row over ``k_far`` (typically a view of the cached keys).
    Otherwise the contract of :func:`two_part_attention_dense` with ``q = 1``. ``mask`` may carry
    :func:`decode_mask`'s result, computed once for all layers of a decoding step (used by half-precision CPU inputs).

    Returns:
        ``[B, H, 1, Dv]``.
    """
    kv, end = v.shape[2], k_far.shape[2]
    start = kv - k_near.shape[2]
    if queries.shape[2] != 2 or (start, end) != near_far_ranges(1, kv, window):
        raise ValueError(f"expected 2 query rows and keys split at {near_far_ranges(1, kv, window)}")
    if queries.device.type == "cpu" and queries.dtype not in (torch.float32, torch.float64):
        # half precision: the CPU flash kernel accumulates scores in float32, a half matmul would round them
        return _decode_with_kernels(queries, k_near, k_far, v, start, end, scale, key_valid, mask)
    # A single query row is a matrix-vector product: two matmuls and one softmax over the [far | near] scores (which
    # line up with the values, as the near range starts where the far range ends) cost about one plain attention,
    # while two flash-kernel calls plus a log-sum-exp merge were ~1.6x slower on CPU for a 4096-token cache. At this
    # size every kernel launch counts: bmm on [B * Hkv, ...] views (torch.matmul's 4-d broadcasting adds launches),
    # no no-op casts or scalings.
    b, h, _, d = queries.shape
    hkv = v.shape[1]
    rows = queries.reshape(b * hkv, h // hkv, 2, d)
    s = torch.cat([torch.bmm(rows[:, :, 1], k_far.flatten(0, 1).mT), torch.bmm(rows[:, :, 0], k_near.flatten(0, 1).mT)],
                  dim=-1)  # fmt: skip
    dt = _compute_dtype(s.dtype)
    if s.dtype != dt:
        s = s.to(dt)
    if scale != 1.0:
        s = s * scale
    if key_valid is not None:
        # finite fill: a padding row that sees no key gets a harmless uniform row instead of NaN
        s = s.view(b, -1, kv).masked_fill(~key_valid.view(b, 1, kv), torch.finfo(dt).min).view(b * hkv, -1, kv)
    p = torch.softmax(s, dim=-1)
    if p.dtype != v.dtype:
        p = p.to(v.dtype)
    return torch.bmm(p, v.flatten(0, 1)).view(b, h, 1, v.shape[-1])


def _decode_with_kernels(queries, k_near, k_far, v, start: int, end: int, scale: float, key_valid, mask) -> Tensor:
    """The two decoding parts on the CPU flash kernel, merged by their log-sum-exps."""
    near_mask, far_mask, lse_bias = decode_mask(v.shape[2], end, key_valid, queries.dtype) if mask is None else mask
    out_near, lse_near = CPU_KERNEL.forward(queries[:, :, :1], k_near, v[:, :, start:], False, near_mask, scale)
    if end == 0:
        return out_near
    out_far, lse_far = CPU_KERNEL.forward(queries[:, :, 1:], k_far, v[:, :, :end], False, far_mask, scale)
    lse = torch.cat([lse_near, lse_far], dim=-1)
    if lse_bias is not None:  # the kernel reports lse = 0 (output 0) for a row that saw no key: weigh it 0
        lse = lse + lse_bias
    weights = torch.softmax(lse, dim=-1).unsqueeze(-1)
    return (out_near * weights[:, :, :1] + out_far * weights[:, :, 1:]).to(v.dtype)


def decode_mask(
    kv_len: int, end: int, key_valid: Tensor | None, dtype: torch.dtype
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Padding masks of :func:`two_part_attention_decode`: additive ``[B, 1, 1, keys]`` masks for the near keys
    ``[start, kv)`` and the far keys ``[0, end)``, and a log-sum-exp bias ``[B, 1, 2]`` (``-inf`` for a part that sees
    no key); all None without padding."""
    if key_valid is None:
        return None, None, None
    start, b = end, key_valid.shape[0]  # one query: the near range starts where the far range ends

    def additive(valid: Tensor) -> Tensor:
        return torch.zeros(b, 1, 1, valid.shape[1], dtype=dtype, device=valid.device).masked_fill(
            ~valid.view(b, 1, 1, -1), float("-inf")
        )

    seen = torch.stack([key_valid[:, start:].any(-1), key_valid[:, :end].any(-1)], dim=-1).view(b, 1, 2)
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    lse_bias = torch.zeros(b, 1, 2, dtype=lse_dtype, device=key_valid.device).masked_fill(~seen, float("-inf"))
    return additive(key_valid[:, start:]), additive(key_valid[:, :end]), lse_bias
