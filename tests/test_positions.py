"""Position maps, rotations and the two-part attention kernels against float64 formulas (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from hf_su.modeling.attention import (
    Rotated,
    merge_attention_parts,
    near_far_ranges,
    two_part_attention,
    two_part_attention_decode,
    two_part_attention_dense,
)
from hf_su.modeling.positions import (
    apply_rotary,
    far_key_positions,
    far_query_positions,
    log_n_scale,
    rerope_distance,
    rotation_matrices,
)

# --------------------------------------------------------------------------------------------------------------------
# Position maps


@pytest.mark.parametrize("leaky", [None, 2, 16.0])
@pytest.mark.parametrize("window", [1, 3, 8])
def test_rerope_distance_matches_piecewise_formula(window, leaky):
    d = torch.arange(40)
    expected = [
        float(x) if x < window else (float(window) if leaky is None else window + (x - window) / leaky)
        for x in range(40)
    ]
    torch.testing.assert_close(rerope_distance(d, window, leaky), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("leaky", [None, 4.0])
def test_far_positions_differ_by_the_far_distance(leaky):
    window = 5
    i = torch.arange(30, dtype=torch.float64)
    j = torch.arange(30, dtype=torch.float64)
    pq = far_query_positions(i, window, leaky)[:, None]
    pk = far_key_positions(j, leaky)
    pk = torch.zeros(1, 30, dtype=torch.float64) if pk is None else pk[None, :]
    d = i[:, None] - j[None, :]
    far = d >= window
    torch.testing.assert_close((pq - pk)[far], rerope_distance(d, window, leaky)[far], rtol=1e-12, atol=1e-12)


def test_leaky_with_huge_slope_tends_to_rerope():
    d = torch.arange(100)
    torch.testing.assert_close(rerope_distance(d, 8, 1e12), rerope_distance(d, 8, None), rtol=0, atol=1e-9)


def test_log_n_scale_matches_formula():
    pos = torch.tensor([0, 1, 7, 8, 100, 4095])
    expected = torch.tensor([max(1.0, math.log(p + 1) / math.log(8)) for p in pos.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log_n_scale(pos, 8), expected)
    assert log_n_scale(torch.tensor([6]), 8).item() == 1.0  # below the training length queries are unchanged


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: rerope_distance(torch.arange(3), 0), "window must be"),
        (lambda: rerope_distance(torch.arange(3), True), "window must be"),
        (lambda: rerope_distance(torch.arange(3), 4, leaky=1), "leaky must be"),
        (lambda: far_query_positions(torch.arange(3), 4, leaky=-2.0), "leaky must be"),
        (lambda: log_n_scale(torch.arange(3), 1.0), "log_scale_base must be"),
        (lambda: log_n_scale(torch.arange(3), "4096"), "log_scale_base must be"),
    ],
)
def test_bad_settings_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------------------------------------------------
# Rotation


def _complex_rotation(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate feature pairs (f, f + R/2) as complex numbers by ``angles [n, R/2]``; extra features pass through."""
    rot = 2 * angles.shape[-1]
    half = rot // 2
    z = torch.complex(x[..., :half], x[..., half:rot]) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([z.real, z.imag, x[..., rot:]], dim=-1)


@pytest.mark.parametrize("rot", [8, 4])
def test_apply_rotary_is_a_complex_rotation(rot):
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    angles = torch.arange(6, dtype=torch.float64)[:, None] * 1.7 * inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    out = apply_rotary(x, emb.cos(), emb.sin())
    torch.testing.assert_close(out, _complex_rotation(x, angles))
    # relative property that ReRoPE relies on: (R_a q) . (R_b k) depends on a - b only
    q, k = x[0, 0, 0], x[0, 0, 1]

    def rotated(v, pos):
        e = torch.cat([pos * inv_freq, pos * inv_freq])
        return apply_rotary(v.view(1, 1, 1, -1), e.cos().view(1, -1), e.sin().view(1, -1)).flatten()

    assert torch.isclose(rotated(q, 9.0) @ rotated(k, 4.0), rotated(q, 5.0) @ rotated(k, 0.0))


def test_apply_rotary_rejects_a_rotary_dim_larger_than_the_head():
    with pytest.raises(ValueError, match="rotary dimension"):
        apply_rotary(torch.randn(1, 1, 2, 4), torch.ones(2, 6), torch.zeros(2, 6))


# --------------------------------------------------------------------------------------------------------------------
# Two-part attention


def _naive_two_part(q_near, k_near, q_far, k_far, v, window, scale):
    groups = q_near.shape[1] // k_near.shape[1]
    k_near, k_far, v = (t.repeat_interleave(groups, 1) for t in (k_near, k_far, v))
    n = q_near.shape[2]
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    scores = torch.where(i - j < window, q_near @ k_near.transpose(-1, -2), q_far @ k_far.transpose(-1, -2))
    scores = (scores * scale).masked_fill(j > i, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _inputs(n, dtype, batch=2, heads=4, kv_heads=2, dim=8):
    shapes = [(batch, heads, n, dim), (batch, kv_heads, n, dim), (batch, heads, n, dim), (batch, kv_heads, n, dim)]
    shapes.append((batch, kv_heads, n, dim))
    return [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]


@pytest.mark.parametrize("kernel", ["cpu", "math"])
@pytest.mark.parametrize(("n", "window"), [(37, 8), (40, 8), (16, 16), (9, 1), (5, 9), (23, 6)])
def test_two_part_attention_forward_and_gradients(kernel, n, window, float_dtype):
    tensors = _inputs(n, float_dtype)
    with torch.no_grad():
        ref_inputs = [t.to(torch.float64).requires_grad_() for t in tensors]
    expected = _naive_two_part(*ref_inputs, window, 0.3)
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, ref_inputs, grad_out)
    out = two_part_attention(*tensors, window=window, scale=0.3, kernel=kernel)
    grads = torch.autograd.grad(out, tensors, grad_out.to(float_dtype))
    tol = dict(rtol=1e-10, atol=1e-10) if float_dtype == torch.float64 else dict(rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(out.double(), expected, **tol)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g.double(), e, **tol)


@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize(("n", "window"), [(30, 7), (6, 9)])
def test_dense_two_part_attention_continues_a_sequence(q_len, n, window):
    q_near, k_near, q_far, k_far, v = (t.detach() for t in _inputs(n, torch.float64))
    expected = _naive_two_part(q_near, k_near, q_far, k_far, v, window, 0.3)[:, :, n - q_len :]
    start, end = near_far_ranges(q_len, n, window)
    out = two_part_attention_dense(
        q_near[:, :, n - q_len :], k_near[:, :, start:], q_far[:, :, n - q_len :], k_far[:, :, :end], v,
        window=window, scale=0.3,
    )  # fmt: skip
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_dense_two_part_attention_ignores_padding_keys():
    n, window = 20, 5
    q_near, k_near, q_far, k_far, v = (t.detach() for t in _inputs(n, torch.float64, batch=1))
    valid = torch.ones(1, n, dtype=torch.bool)
    valid[0, :6] = False  # left padding: the reference simply drops those keys
    expected = _naive_two_part(*(t[:, :, 6:] for t in (q_near, k_near, q_far, k_far, v)), window, 0.3)[:, :, -1:]
    start, end = near_far_ranges(1, n, window)
    out = two_part_attention_dense(
        q_near[:, :, -1:], k_near[:, :, start:], q_far[:, :, -1:], k_far[:, :, :end], v, window=window, scale=0.3,
        key_valid=valid,
    )  # fmt: skip
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_merge_of_two_parts_is_attention_over_the_union():
    q = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    k = torch.randn(1, 2, 9, 4, dtype=torch.float64)
    v = torch.randn(1, 2, 9, 3, dtype=torch.float64)
    scores = q @ k.transpose(-1, -2)
    scores[..., 0, 4:] = float("-inf")  # row 0 sees nothing in the second part

    def part(s, vv):
        lse = torch.logsumexp(s, dim=-1)
        return torch.nan_to_num(torch.softmax(s, dim=-1)) @ vv, lse

    out, lse = merge_attention_parts(*part(scores[..., :4], v[:, :, :4]), *part(scores[..., 4:], v[:, :, 4:]))
    torch.testing.assert_close(out, torch.softmax(scores, dim=-1) @ v)
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1))


def test_two_part_attention_validates_shapes():
    q_near, k_near, q_far, k_far, v = (t.detach() for t in _inputs(8, torch.float32))
    with pytest.raises(ValueError, match="not a multiple"):
        two_part_attention(q_near[:, :3], k_near, q_far[:, :3], k_far, v, window=2, scale=1.0)
    with pytest.raises(ValueError, match="kernel must be"):
        two_part_attention(q_near, k_near, q_far, k_far, v, window=2, scale=1.0, kernel="triton")


def _fake_flash_attn_func(q, k, v, softmax_scale, causal, window_size=(-1, -1), return_attn_probs=False):
    """A CPU stand-in with flash-attn's contract: [B, n, H, D] layout, bottom-right causal alignment,
    ``window_size=(left, right)``, returns (out, softmax_lse [B, H, n], probs)."""
    q, k, v = (t.transpose(1, 2).to(torch.float64) for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    nq, nk = q.shape[2], k.shape[2]
    i = torch.arange(nq)[:, None] + (nk - nq)  # bottom-right alignment
    j = torch.arange(nk)[None, :]
    allowed = (j <= i) if causal else torch.ones(nq, nk, dtype=torch.bool)
    if window_size[0] >= 0:
        allowed = allowed & (i - j <= window_size[0])
    scores = (q @ k.transpose(-1, -2) * softmax_scale).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2).to(torch.float32), lse.to(torch.float32), None


@pytest.mark.parametrize(("n", "window"), [(37, 8), (6, 9)])
def test_flash_attn_path_matches_reference_with_a_cpu_stand_in(monkeypatch, n, window):
    """The CUDA path's decomposition (sliding window + bottom-right causal far part, merged) checked on CPU."""
    import sys
    import types

    from hf_su.modeling.attention import _flash_two_part_forward

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=_fake_flash_attn_func))
    tensors = [t.detach() for t in _inputs(n, torch.float32)]
    expected = _naive_two_part(*(t.double() for t in tensors), window, 0.3)
    out = _flash_two_part_forward(*tensors, window, 0.3)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("group", "chunk", "blocks"), [(1, 3, (1, 3)), (5, 16, (4, 2)), (64, 64, (3, 4))])
def test_two_part_attention_with_several_kernel_calls_per_row(monkeypatch, group, chunk, blocks):
    """Near blocks (of other sizes forward than backward) and far rows split over several kernel calls give the same
    values and gradients."""
    from hf_su.modeling import attention

    monkeypatch.setattr(attention, "NEAR_GROUP_QUERIES", group)
    monkeypatch.setattr(attention, "FAR_CHUNK", chunk)
    monkeypatch.setattr(attention, "NEAR_BLOCK", blocks[0])
    monkeypatch.setattr(attention, "NEAR_BLOCK_BACKWARD", blocks[1])
    tensors = _inputs(41, torch.float64)
    expected = _naive_two_part(*tensors, 8, 0.3)
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, tensors, grad_out)
    out = two_part_attention(*tensors, window=8, scale=0.3, kernel="cpu")
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for g, e in zip(torch.autograd.grad(out, tensors, grad_out), expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def _cos_sin(positions: torch.Tensor, rot: int, dtype=torch.float64):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    ang = positions.to(torch.float64)[..., None] * inv_freq
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("rot", [8, 4])
def test_rotation_matrices_and_rotation_into_a_buffer_rotate_like_apply_rotary(rot):
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    cos, sin = _cos_sin(torch.tensor([[0.0, 1.5, 7.0, 30.0, 2.25]] * 2), rot)
    expected = apply_rotary(x, cos, sin)
    out = torch.empty_like(x)
    assert apply_rotary(x, cos, sin, out=out) is out
    torch.testing.assert_close(out, expected, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(torch.matmul(x.unsqueeze(-2), rotation_matrices(cos, sin, 8).unsqueeze(1)).squeeze(-2),
                               expected, rtol=1e-14, atol=1e-14)  # fmt: skip


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("chunk", [4, 64])
def test_far_operands_rotated_on_the_fly_equal_rotated_tensors(monkeypatch, grad, chunk):
    """Leaky-style far operands given as ``Rotated`` (rotated chunk by chunk, several key chunks per row chunk)
    give the attention of the rotated tensors, and its gradients with respect to the raw tensors."""
    from hf_su.modeling import attention

    monkeypatch.setattr(attention, "FAR_CHUNK", chunk)
    n, window = 29, 6
    q_near, k_near, q_raw, k_raw, v = _inputs(n, torch.float64)
    pos = torch.arange(n)
    cos_q, sin_q = _cos_sin(far_query_positions(pos, window, 4.0), 8)
    cos_k, sin_k = _cos_sin(far_key_positions(pos, 4.0), 8)
    expected = _naive_two_part(
        q_near, k_near, apply_rotary(q_raw, cos_q, sin_q), apply_rotary(k_raw, cos_k, sin_k), v, window, 0.3
    )
    with torch.set_grad_enabled(grad):
        out = two_part_attention(
            q_near, k_near, Rotated(q_raw, cos_q, sin_q), Rotated(k_raw, cos_k, sin_k), v, window=window, scale=0.3
        )
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert out.requires_grad == grad
    if grad:
        grad_out = torch.randn_like(expected)
        tensors = (q_near, k_near, q_raw, k_raw, v)
        for g, e in zip(torch.autograd.grad(out, tensors, grad_out), torch.autograd.grad(expected, tensors, grad_out)):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize(("n", "window"), [(30, 7), (6, 9)])
def test_decoding_attention_matches_reference(dtype, padded, n, window):
    """One query against a cache (matmul path for fp32/fp64, CPU kernels for bf16), with left padding."""
    q_near, k_near, q_far, k_far, v = (t.detach() for t in _inputs(n, torch.float64))
    valid = torch.ones(2, n, dtype=torch.bool)
    if padded:
        valid[1, :4] = False  # left padding of row 1: the reference drops those keys
    scale, rows = 0.3, []
    for b in range(2):
        keep = valid[b]
        part = [t[b : b + 1, :, keep] for t in (q_near, k_near, q_far, k_far, v)]
        rows.append(_naive_two_part(*part, window, scale)[:, :, -1:])
    expected = torch.cat(rows)
    start, end = near_far_ranges(1, n, window)
    queries = torch.cat([q_near[:, :, -1:], q_far[:, :, -1:]], dim=2)
    out = two_part_attention_decode(
        queries.to(dtype), k_near[:, :, start:].to(dtype), k_far[:, :, :end].to(dtype), v.to(dtype), window=window,
        scale=scale, key_valid=valid if padded else None,
    )  # fmt: skip
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
