"""Parallel associative scan for batched linear recurrences ``h_t = A_t h_{t-1} + b_t``.

Two forms share one algorithm: *matrix* transitions ``A [B, T, H, H]`` (``A_t @ h``) and *diagonal* transitions
``A [B, T, H]`` (``A_t * h``, elementwise). Elements ``(A, b)`` compose with the associative operator

    (A_j, b_j) o (A_i, b_i) = (A_j A_i,  A_j b_i + b_j)        (i before j)

and the prefix compositions are computed by the work-efficient odd/even recursion (Blelloch; the shape of
``jax.lax.associative_scan``): combine neighbouring pairs, scan the half-length sequence, then fill in the even
positions. Depth is ``2 log2 T`` batched tensor operations, work is ``O(T)`` compositions.

Only the ``b`` half of each prefix is needed for the states, and the fill-in step only reads the ``b`` half of the
half-length prefixes, so matrix products ``A_j A_i`` are formed in the pair-combining (up-sweep) step only:
about ``T`` small matmuls in all, plus ``2T`` matrix-vector products.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _apply(A: Tensor, h: Tensor, diagonal: bool) -> Tensor:
    """``A h`` for a batch of transitions and vectors (matching leading dims)."""
    if diagonal:
        return A * h
    return torch.matmul(A, h.unsqueeze(-1)).squeeze(-1)


def _compose(A_later: Tensor, A_earlier: Tensor, diagonal: bool) -> Tensor:
    return A_later * A_earlier if diagonal else torch.matmul(A_later, A_earlier)


def _prefix_states(A: Tensor, b: Tensor, diagonal: bool, out: Tensor) -> None:
    """Write the inclusive prefix of the ``b`` half along dim 1 into ``out``, the state before element 0 being zero.

    ``out`` may be a strided view: each level writes its odd positions straight into the caller's buffer, so the
    interleaving costs no copies.
    """
    T = b.shape[1]
    if T == 1:
        out.copy_(b)
        return
    pairs = T // 2
    A_left, A_right = A[:, 0 : 2 * pairs : 2], A[:, 1 : 2 * pairs : 2]
    b_left, b_right = b[:, 0 : 2 * pairs : 2], b[:, 1 : 2 * pairs : 2]
    pair_b = _apply(A_right, b_left, diagonal).add_(b_right)
    # The next level only needs transitions when it will itself combine pairs.
    pair_A = _compose(A_right, A_left, diagonal) if pairs > 1 else A_right
    odd = out[:, 1::2]  # states at positions 1, 3, 5, ...
    _prefix_states(pair_A, pair_b, diagonal, odd)
    out[:, 0] = b[:, 0]
    n_rest = (T - 1) // 2  # even positions 2, 4, ...
    if n_rest:
        if diagonal:
            torch.addcmul(b[:, 2::2], A[:, 2::2], odd[:, :n_rest], out=out[:, 2::2])
        else:
            out[:, 2::2] = _apply(A[:, 2::2], odd[:, :n_rest], diagonal).add_(b[:, 2::2])


def fold_initial_state_(A: Tensor, b: Tensor, h0: Tensor) -> Tensor:
    """``b_1 += A_1 h0`` in place: the recurrence from ``h0`` equals the one from zero with this offset."""
    diagonal = A.shape == b.shape
    b[:, 0] += _apply(A[:, 0], h0, diagonal)
    return b


def linear_recurrence(A: Tensor, b: Tensor, h0: Tensor | None = None, *, reverse: bool = False) -> Tensor:
    """Solve ``h_t = A_t h_{t-1} + b_t`` for all ``t`` at once by a parallel associative scan.

    Args:
        A: transitions, ``[B, T, H, H]`` (matrix form) or ``[B, T, H]`` (diagonal form, elementwise products).
        b: offsets ``[B, T, H]``.
        h0: the state before the first step, ``[B, H]``; zeros when ``None``.
        reverse: run the recurrence backwards in time, ``h_t = A_t h_{t+1} + b_t`` with ``h0`` the state after
            the last step (the form of adjoint / backward-in-time recurrences).

    Returns:
        The states ``h_1..h_T`` as ``[B, T, H]``.

    Raises:
        ValueError: on shapes that do not describe one of the two forms.
    """
    if b.dim() != 3:
        raise ValueError(f"b must be [B, T, H], got shape {tuple(b.shape)}")
    if A.shape == b.shape:
        diagonal = True
    elif A.dim() == 4 and A.shape[:3] == b.shape and A.shape[-1] == b.shape[-1]:
        diagonal = False
    else:
        raise ValueError(
            f"A must be [B, T, H] (diagonal) or [B, T, H, H] (matrix) for b of shape {tuple(b.shape)}, "
            f"got {tuple(A.shape)}"
        )
    if h0 is not None and h0.shape != (b.shape[0], b.shape[2]):
        raise ValueError(f"h0 must be [B, H] = {(b.shape[0], b.shape[2])}, got {tuple(h0.shape)}")
    if b.shape[1] == 0:
        return b.clone()
    if reverse:
        A, b = A.flip(1), b.flip(1)  # flip copies, so folding h0 below leaves the caller's b alone
    if h0 is not None:
        b = fold_initial_state_(A, b if reverse else b.clone(), h0)
    h = torch.empty_like(b)
    _prefix_states(A, b, diagonal, h)
    return h.flip(1) if reverse else h
