"""DEER: evaluate a non-linear RNN in parallel over the sequence length (Lim et al. 2023; Su, kexue.fm 9783).

The whole trajectory ``h_1..h_T`` of ``h_t = f(h_{t-1}, x_t)`` is the root of ``h_t - f(h_{t-1}, x_t) = 0``.
Linearising ``f`` around the current guess gives a *linear* recurrence

    h_t = J_t h_{t-1} + (f(h'_{t-1}, x_t) - J_t h'_{t-1}),      J_t = df/dh (h'_{t-1}, x_t)

that a parallel associative scan solves in ``O(log T)`` depth (:mod:`hf_su.modeling.scan`). Iterating is Newton's
method on the whole sequence (``mode="newton"``, full ``H x H`` Jacobians, quadratic convergence near the
solution, ``O(T H^3)`` scan work). ``mode="quasi"`` keeps only the Jacobians' diagonals (quasi-DEER, Gonzalez et al.
2024): an elementwise scan, ``O(T H)`` memory, more but cheaper iterations. Both converge to the same fixed point and
both are exact after at most ``T`` iterations (each iteration fixes at least one more leading step).

On CPU the iteration runs on chunks of consecutive steps (multiple shooting, :class:`_ChunkedSolve`): every chunk
is integrated exactly from its start state, all chunks at once, one cell call per step on cache-resident slabs,
and the Newton (or quasi-Newton) iteration with its scan acts on the chunk start states only. A start error fades
inside a chunk for contractive cells, so long sequences converge in one or two iterations. On accelerators, and
for short sequences, chunks are single steps: plain DEER.

Gradients use implicit differentiation at the solution: the adjoint recurrence
``lambda_t = g_t + J_{t+1}^T lambda_{t+1}`` is solved backwards in time, then ``lambda`` is back-propagated through
one parallel call of the cell, which delivers the gradients for the inputs, ``h0`` and every tensor the cell uses.
Nothing is back-propagated through the iterations. The adjoint recurrence is linear, so it is solved on the forward's
chunks too (:class:`_ChunkedAdjoint`): every chunk is integrated exactly backwards, one VJP of the cell per slab,
and the chunk end values come from the scan over chunks, preconditioned by the forward's chunk transitions (one
scan and two sweeps for a contractive cell). With one-step chunks it is plain DEER's adjoint: scans over all steps
iterated on full-sequence VJPs. ``cell_vjp`` (e.g. :func:`gru_cell_vjp`) replaces autograd for those VJPs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .scan import linear_recurrence

__all__ = [
    "DEERConvergenceError",
    "DEERInfo",
    "ParallelGRU",
    "deer_rnn",
    "gru_cell",
    "gru_cell_and_diagonal",
    "gru_cell_vjp",
]

Cell = Callable[[Tensor, Tensor], Tensor]
CellAndDiagonal = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
CellVJP = Callable[[Tensor, Tensor], Callable[[Tensor], Tensor]]

MODES = ("newton", "quasi")

# Accepted scaled residual max_t |h_t - f(h_{t-1}, x_t)| / (1 + max_t |h_t|). About a hundred ulps: reachable in
# spite of the rounding of long scans, and tight enough that the trajectory matches a sequential loop (float32
# <= 1e-4, float64 <= 1e-8 for contractive cells, whose errors are at most residual / (1 - contraction)).
DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}

# Iterates are kept finite between Newton steps (as the reference does for RNNs): a step that overflows still
# leaves its exact prefix intact, so the "one more exact step per iteration" guarantee survives. The answer itself
# is only ever accepted on its residual.
_CLAMP = 1e8

# Elements (rows x (H + I)) per cell call on CPU (a slab of the chunked sweep, a block of the fused diagonals in the
# backward pass): about a MiB of operands, which stays in L2 cache, where elementwise ops run several times faster
# than on arrays streamed from memory, and ~4k rows for H=16, enough that torch's per-op overhead stays small.
_CPU_BLOCK_ELEMENTS = 1 << 18

# Steps per chunk that the CPU sweep aims for. A start error of a contractive cell fades within a few dozen steps, so
# the iteration on chunk starts converges in one or two steps (a GRU: 1 from T=1k to 64k), while shorter chunks need
# more iterations (2-step chunks: 7) and longer ones only add sequential cell calls.
_CHUNK_STEPS = 32

# Elements per chunk of the batched Jacobian probes (H probes x rows x H outputs), to bound memory.
_PROBE_BUDGET = 1 << 23


class DEERInfo(NamedTuple):
    """Convergence report of :func:`deer_rnn`."""

    iterations: int
    """Newton (or quasi-Newton) steps taken, i.e. parallel linear solves; 0 when the first sweep already fits
    (always the case for a single chunk, e.g. ``T = 1``)."""
    residual: float
    """Scaled residual ``max_t |h_t - cell(h_{t-1}, x_t)| / (1 + max_t |h_t|)`` of the returned trajectory."""


class _Chunks(NamedTuple):
    """The forward pass's chunk layout and linearisation, which the chunked adjoint reuses."""

    steps: int
    """``C``, steps per chunk (the number of chunks ``K`` is ``transitions.shape[1]``)."""
    transitions: Tensor
    """``P_k``, ``[B, K, H(, H)]``: products of the chunk's step Jacobians (diagonals in quasi mode) at the last
    refresh of the forward iteration."""


class DEERConvergenceError(RuntimeError):
    """Raised when DEER (forward, or the adjoint solve of the backward pass) misses its tolerance in ``max_iters``."""

    def __init__(self, message: str, iterations: int, residual: float) -> None:
        super().__init__(message)
        self.iterations = iterations
        self.residual = residual


def _transition(cell: Cell, h_prev: Tensor, x: Tensor, diagonal: bool) -> Tensor:
    """Per-row Jacobians ``d cell / d h_prev``: ``[N, H, H]``, or their diagonals ``[N, H]``.

    Forward-mode probes, one per state coordinate, batched with ``vmap`` over the probe direction only: the cell
    always sees real ``[rows, H]`` batches, the probe-independent part of the cell (e.g. input projections) is
    computed once, and rows are chunked to bound memory. The diagonal needs the same ``H`` probes as the full
    Jacobian: a single JVP with a ones tangent would give row *sums* ``J 1``, which equal the diagonal only for
    cells whose Jacobian is already diagonal, and is a poor (possibly divergent) approximation for dense cells such as
    a GRU. Quasi mode saves the ``O(H^3)`` matrix products and the ``H^2`` memory per row, not the probes; it keeps
    the diagonals of the first sweep, though, and probes again only when the iteration stalls.
    """
    n_rows, H = h_prev.shape
    eye = torch.eye(H, dtype=h_prev.dtype, device=h_prev.device)
    chunk = max(1, _PROBE_BUDGET // (H * H))
    parts = []
    for start in range(0, n_rows, chunk):
        h_c, x_c = h_prev[start : start + chunk], x[start : start + chunk]

        def probe(v: Tensor, h_c: Tensor = h_c, x_c: Tensor = x_c) -> Tensor:
            return torch.func.jvp(lambda h: cell(h, x_c), (h_c,), (v.expand_as(h_c),))[1]

        columns = torch.func.vmap(probe)(eye)  # [H in, rows, H out]
        parts.append(columns.diagonal(dim1=0, dim2=2) if diagonal else columns.permute(1, 2, 0))
    return torch.cat(parts)


def _evaluate(cell: Cell, h_prev: Tensor, x: Tensor, name: str = "cell(h_prev, x_t)") -> Tensor:
    out = cell(h_prev, x)
    _check_like(out, h_prev, name)
    return out


def _check_like(out: object, h_prev: Tensor, name: str) -> None:
    if not isinstance(out, Tensor) or out.shape != h_prev.shape or out.dtype != h_prev.dtype:
        got = f"shape {tuple(out.shape)}, dtype {out.dtype}" if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"{name} must return a tensor like h_prev (shape {tuple(h_prev.shape)}, dtype {h_prev.dtype}); got {got}"
        )


def _shift(h: Tensor, h0: Tensor) -> Tensor:
    """``h_{t-1}`` for every ``t``: ``[h0, h_1, ..., h_{T-1}]``."""
    return torch.cat([h0.unsqueeze(1), h[:, :-1]], dim=1)


def _chunking(B: int, T: int, H: int, I: int, device: torch.device) -> tuple[int, int]:  # noqa: E741
    """``(C, K)``: the sequence is cut into ``K`` chunks of ``C`` consecutive steps (``C * K >= T``).

    One slab (the same step of every chunk, ``B*K`` rows) is what the sweep hands to the cell at once. On CPU chunks
    aim at :data:`_CHUNK_STEPS` steps, and there are at most as many as keep a slab within
    :data:`_CPU_BLOCK_ELEMENTS` (in L2 cache, where elementwise ops run several times faster than on arrays streamed
    from memory). Elsewhere every chunk is one step (``C = 1``): plain DEER, the cell sees all ``B*T`` rows at once
    and the scan does all the work, as suits a massively parallel device.
    """
    if device.type != "cpu":
        return 1, T
    chunks = max(1, min(-(-T // _CHUNK_STEPS), _CPU_BLOCK_ELEMENTS // (H + I) // B))
    C = -(-T // chunks)
    return C, -(-T // C)


def _to_chunks(x: Tensor, C: int, K: int) -> Tensor:
    """``[B, T, F]`` -> ``[B, K, C, F]``: ``K`` chunks of ``C`` steps, the tail padded with zeros when ``C*K > T``.

    A view when nothing is padded; step ``c`` of every chunk, ``chunks[:, :, c]``, then reshapes to ``[B*K, F]``
    rows without a copy (row stride ``C*F``), in ``(b, k)`` order.
    """
    B, T, _ = x.shape
    if C * K != T:
        x = F.pad(x, (0, 0, 0, C * K - T))
    return x.view(B, K, C, -1)


def _affine(base: Tensor, A: Tensor, v: Tensor, value: float = 1.0) -> Tensor:
    """``base + value * (A v)`` for diagonal (``A`` shaped like ``v``) or matrix transitions."""
    if A.dim() == v.dim():
        return torch.addcmul(base, A, v, value=value)
    return torch.add(base, torch.matmul(A, v.unsqueeze(-1)).squeeze(-1), alpha=value)


# Quasi mode takes the transitions of the first sweep and keeps them while the residual falls at least this fast
# per iteration. Its contraction comes from the neglected off-diagonal couplings, not from where the diagonals were
# taken, so stale diagonals converge about as fast as fresh ones (a GRU with one-step chunks: at most one more
# iteration; with longer chunks: none), and a sweep without them costs one cell call per slab instead of a fused
# call or H probes. A slower step brings fresh ones back. Newton mode always refreshes (quadratic convergence).
_KEEP_DIAGONAL_RATE = 0.5


@dataclass
class _Problem:
    """One RNN evaluation: the cell, its inputs as ``N = B*T`` independent rows, and the solver options."""

    cell: Cell
    cell_and_diagonal: CellAndDiagonal | None
    x: Tensor  # [N, I]
    shape: tuple[int, int, int]  # B, T, H
    diagonal: bool
    tol: float
    max_iters: int
    cell_vjp: CellVJP | None = None

    def rows(self, h: Tensor) -> Tensor:
        return h.reshape(-1, self.shape[2])

    def steps(self, h: Tensor) -> Tensor:
        return h.reshape(self.shape)

    def _fused(self, h_prev: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.cell_and_diagonal(h_prev, x)
        if not isinstance(out, tuple) or len(out) != 2:
            raise ValueError("cell_and_diagonal must return a pair (cell(h_prev, x_t), diagonal of d cell / d h_prev)")
        _check_like(out[0], h_prev, "cell_and_diagonal(h_prev, x_t)[0]")
        _check_like(out[1], h_prev, "cell_and_diagonal(h_prev, x_t)[1]")
        return out

    def vjp(self, h_prev: Tensor, x: Tensor, check: bool = False) -> Callable[[Tensor], Tensor]:
        """``v -> J^T v`` at rows ``h_prev``: the fused ``cell_vjp`` (compared with autograd once, when ``check``),
        else autograd through one recorded cell call (:func:`_slab_vjp`)."""
        if self.cell_vjp is None:
            return _slab_vjp(self.cell, h_prev, x)
        if check:
            self._check_vjp(h_prev, x)
        return self.cell_vjp(h_prev, x)

    def _check_vjp(self, h_prev: Tensor, x: Tensor) -> None:
        # A wrong fused VJP would give wrong gradients that still pass the adjoint's residual test (the residual is
        # measured with it): compare it with autograd on a few rows and a fixed pseudo-random direction.
        h_prev, x = h_prev[:256], x[:256]
        generator = torch.Generator(device=h_prev.device).manual_seed(0)
        v = torch.randn(h_prev.shape, generator=generator, device=h_prev.device).to(h_prev.dtype)
        fused = self.cell_vjp(h_prev, x)
        if not callable(fused):
            raise TypeError(f"cell_vjp(h_prev, x_t) must return a function v -> J^T v, got {type(fused).__name__}")
        got = fused(v)
        _check_like(got, h_prev, "cell_vjp(h_prev, x_t)(v)")
        expected = _slab_vjp(self.cell, h_prev, x)(v)
        if (got - expected).abs().max() > self.tol * (1 + expected.abs().max()):
            raise ValueError("cell_vjp(h_prev, x_t)(v) disagrees with autograd's v^T d cell(h_prev, x_t) / d h_prev")

    def value_and_transitions(self, h_prev: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """``cell`` and its Jacobians (diagonals in quasi mode) at rows ``h_prev [n, H]``."""
        if self.cell_and_diagonal is not None:
            return self._fused(h_prev, x)
        return _evaluate(self.cell, h_prev, x), _transition(self.cell, h_prev, x, self.diagonal)

    def transitions(self, h_prev: Tensor) -> Tensor:
        """Jacobians (or their diagonals) at ``h_prev``, ``[B, T, H(, H)]``."""
        rows = self.rows(h_prev)
        if self.cell_and_diagonal is None:
            J = _transition(self.cell, rows, self.x, self.diagonal)
        else:
            block = max(1, _CPU_BLOCK_ELEMENTS // (rows.shape[1] + self.x.shape[1])) if rows.is_cpu else len(rows)
            J = torch.cat(
                [self._fused(rows[s : s + block], self.x[s : s + block])[1] for s in range(0, len(rows), block)]
            )
        return J.reshape(*self.shape, *J.shape[2:])

    def solve(self, h0: Tensor) -> tuple[Tensor, DEERInfo, _Chunks | None]:
        """Iterate to the fixed point from the initial guess ``h_t = h0`` (as the reference does).

        Returns the trajectory, the report and the chunks (``None`` for one-step chunks, i.e. plain DEER), which
        the chunked adjoint reuses.
        """
        chunks = _ChunkedSolve(self, h0)
        residual, previous = math.inf, math.inf
        for iteration in range(self.max_iters + 1):
            stalled = not math.isfinite(residual) or residual > _KEEP_DIAGONAL_RATE * previous
            refresh = not self.diagonal or iteration == 0 or stalled
            previous = residual
            residual = chunks.sweep(refresh)
            if residual <= self.tol and refresh and self.cell_and_diagonal is not None:
                # The fused function only speeds things up: the answer must be the cell's own trajectory.
                residual = chunks.sweep(refresh=False)
            if residual <= self.tol:
                return (
                    chunks.result(),
                    DEERInfo(iteration, residual),
                    (_Chunks(chunks.C, chunks.P) if chunks.C > 1 else None),
                )
            if iteration == self.max_iters:
                break
            chunks.advance()
        raise DEERConvergenceError(
            f"DEER did not converge in max_iters={self.max_iters} iterations (mode="
            f"{'quasi' if self.diagonal else 'newton'}): scaled residual {residual:.3g} > tol {self.tol:.3g}. "
            "Raise max_iters (at most T iterations are ever needed), try mode='newton', or loosen tol.",
            self.max_iters,
            residual,
        )

    def solve_adjoint(self, h_prev: Tensor, grad: Tensor, chunks: _Chunks | None) -> Tensor:
        """``lambda`` with ``lambda_t = g_t + J_{t+1}^T lambda_{t+1}`` (``lambda_T = g_T``), Jacobians at ``h_prev``.

        On the forward pass's ``chunks`` (:class:`_ChunkedAdjoint`) when they are longer than one step; otherwise
        by :meth:`_stepwise_adjoint`.
        """
        if chunks is None:
            return self._stepwise_adjoint(h_prev, grad)
        return _ChunkedAdjoint(self, h_prev, chunks).solve(grad)

    def _stepwise_adjoint(self, h_prev: Tensor, grad: Tensor) -> Tensor:
        """The adjoint solve of plain DEER (one-step chunks): preconditioned iteration over full-sequence VJPs.

        Exact transposed-Jacobian products come from one reusable VJP of the parallel cell call; the scan is
        preconditioned with the mode's transitions (exact for Newton: one solve, one check; diagonals for quasi:
        iterated like the forward pass).
        """
        vjp = self.vjp(self.rows(h_prev), self.x, check=True)
        M = self.transitions(h_prev)
        # lambda_t couples to step t+1: shift the transitions one step earlier; the last one meets a zero end state.
        A = torch.roll(M if self.diagonal else M.transpose(-1, -2), shifts=-1, dims=1)
        lam = linear_recurrence(A, grad, reverse=True)
        residual = math.inf
        for iteration in range(1, self.max_iters + 1):
            JT_lam = self.steps(vjp(self.rows(lam)))
            residual_t = grad - lam
            residual_t[:, :-1] += JT_lam[:, 1:]
            err, scale = residual_t.abs().amax(), lam.abs().amax()
            residual = float(err / scale) if scale > 0 else float(err)
            if err <= self.tol * scale:
                return lam
            if iteration < self.max_iters:
                lam = lam + linear_recurrence(A, residual_t, reverse=True)
        raise self.adjoint_error(residual)

    def adjoint_error(self, residual: float) -> DEERConvergenceError:
        return DEERConvergenceError(
            f"DEER backward: the adjoint solve did not converge in max_iters={self.max_iters} iterations "
            f"(relative residual {residual:.3g} > tol {self.tol:.3g}). Raise max_iters or try mode='newton'.",
            self.max_iters,
            residual,
        )


class _ChunkedSolve:
    """The forward iteration of :meth:`_Problem.solve`, on chunks of consecutive steps (multiple shooting).

    The sequence is cut into ``K`` chunks of ``C`` steps (:func:`_chunking`); slab ``c`` holds step ``c`` of every
    chunk, ``B*K`` rows. The unknowns of the Newton iteration are the chunk start states ``s_k`` (``s_0 = h0``). A
    sweep integrates every chunk exactly from its current start, one cell call per slab, which gives the chunk ends
    ``e_k = Phi_k(s_k)``; the trajectory is consistent when ``s_{k+1} = e_k``. Linearising ``Phi_k`` gives the same
    linear recurrence as DEER, over chunks instead of steps,

        s_{k+1} = P_k s_k + (e_k - P_k s'_k),      P_k = J_{C-1,k} ... J_{0,k}   (diagonals in quasi mode)

    solved by the parallel scan. With ``C = 1`` this is exactly DEER. Longer chunks trade depth for speed where it
    pays (CPU): the cell then runs on cache-resident slabs, the steps inside a chunk are exact instead of iterated,
    and a start error fades inside a chunk for any contractive cell, so few iterations are needed. The guarantees
    are DEER's: every iteration makes at least one more chunk exact (at most ``K <= T`` iterations), and the answer
    is accepted on the residual of the returned trajectory, which is zero inside chunks by construction (every
    state there *is* ``cell`` of its predecessor) and ``|e_k - s_{k+1}|`` at the chunk boundaries, where the
    trajectory takes the start ``s_{k+1}`` as the last state of chunk ``k``.
    """

    def __init__(self, problem: _Problem, h0: Tensor) -> None:
        B, T, H = problem.shape
        I = problem.x.shape[-1]  # noqa: E741
        self.problem, self.h0, self.T = problem, h0, T
        self.C, self.K = _chunking(B, T, H, I, h0.device)
        self.x = _to_chunks(problem.x.view(B, T, I), self.C, self.K)  # [B, K, C, I]
        self.starts = h0.unsqueeze(1).repeat(1, self.K, 1)  # [B, K, H]; the reference's initial guess h_t = h0
        self.P: Tensor | None = None  # chunk transitions [B, K, H(, H)]
        self.states: list[Tensor] = []  # the last sweep: one [B*K, H] slab per step
        # The last chunk ends with padding when C does not divide T: its steps from `real_steps` on lie past T.
        self.real_steps = T - (self.K - 1) * self.C
        self.fused_checked = False

    def sweep(self, refresh: bool) -> float:
        """Integrate every chunk from its start; returns the scaled residual of the resulting trajectory.

        ``refresh``: also accumulate the chunk transitions ``P`` (fused diagonals, probes or full Jacobians along
        the way); otherwise the last ones are kept and only ``cell`` runs.
        """
        problem, (B, K, H) = self.problem, self.starts.shape
        prev, sizes, self.states, P = self.starts.view(B * K, H), [], [], None
        for c in range(self.C):
            x = self.x[:, :, c].reshape(B * K, -1)
            if refresh:
                value, J = problem.value_and_transitions(prev, x)
                if problem.cell_and_diagonal is not None and not self.fused_checked:
                    self._check_fused(value, prev, x)
                P = J if c == 0 else (J * P if problem.diagonal else torch.matmul(J, P))
            else:
                value = _evaluate(problem.cell, prev, x)
            self.states.append(value)
            if c < self.C - 1:  # the last slab is replaced by the next starts, measured below
                sizes += torch.aminmax(value if c < self.real_steps else value.view(B, K, H)[:, :-1])
            prev = value
        if refresh:
            self.P = P.view(B, K, *P.shape[1:])
        ends = self.states[-1].view(B, K, H)
        last = self._last_slab(ends)
        sizes += torch.aminmax(last if self.real_steps == self.C else last[:, :-1])
        err = (ends[:, :-1] - self.starts[:, 1:]).abs().max() if K > 1 else ends.new_zeros(())
        scaled = float(err / (1 + torch.stack(sizes).abs().max()))
        return scaled if math.isfinite(scaled) else math.inf

    def _last_slab(self, ends: Tensor) -> Tensor:
        """The trajectory's last step of every chunk, ``[B, K, H]``: the next chunk's start; the last chunk's end."""
        return torch.cat([self.starts[:, 1:], ends[:, -1:]], dim=1)

    def _check_fused(self, fused: Tensor, h_prev: Tensor, x: Tensor) -> None:
        # A wrong fused value only costs iterations (answers are accepted on `cell` alone), but it is a bug worth
        # reporting: compare once, on the first slab.
        self.fused_checked = True
        value = _evaluate(self.problem.cell, h_prev, x)
        if (fused - value).abs().max() > self.problem.tol * (1 + value.abs().max()):
            raise ValueError("cell_and_diagonal(h_prev, x_t)[0] disagrees with cell(h_prev, x_t)")

    def advance(self) -> None:
        """Newton step on the chunk starts: ``s_{k+1} = P_k s_k + (e_k - P_k s'_k)`` by the parallel scan."""
        if self.K == 1:
            return
        ends, P = self.states[-1].view(self.starts.shape), self.P[:, :-1]
        new = linear_recurrence(P, _affine(ends[:, :-1], P, self.starts[:, :-1], value=-1.0), self.h0)
        # Starts are kept finite (as the reference does for RNNs): a chunk that overflows still leaves the exact
        # chunks before it intact, so the "one more exact chunk per iteration" guarantee survives.
        torch.nan_to_num_(new, nan=0.0, posinf=_CLAMP, neginf=-_CLAMP)
        self.starts = torch.cat([self.h0.unsqueeze(1), new], dim=1)

    def result(self) -> Tensor:
        """The trajectory of the last sweep, ``[B, T, H]``."""
        B, K, H = self.starts.shape
        slabs = [state.view(B, K, H) for state in self.states[:-1]]
        slabs.append(self._last_slab(self.states[-1].view(B, K, H)))
        return torch.stack(slabs, dim=2).view(B, K * self.C, H)[:, : self.T].contiguous()


def _slab_vjp(cell: Cell, h_prev: Tensor, x: Tensor) -> Callable[[Tensor], Tensor]:
    """``v -> J^T v`` for the rows ``h_prev [n, H]``: one recorded cell call, back-propagated once per use.

    Plain autograd rather than ``torch.func.vjp``: on the small slabs of the chunked adjoint the functorch wrapper
    costs more than the cell call itself. Only the path to ``h_prev`` is differentiated (no parameter gradients).
    """
    with torch.enable_grad():
        h_prev = h_prev.detach().requires_grad_()
        out = _evaluate(cell, h_prev, x)

    def vjp(v: Tensor) -> Tensor:
        if not out.requires_grad:  # the cell ignores its state (and reads nothing that requires grad): J = 0
            return torch.zeros_like(v)
        (grad,) = torch.autograd.grad(out, h_prev, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if grad is None else grad

    return vjp


class _ChunkedAdjoint:
    """The adjoint solve of :meth:`_Problem.solve_adjoint` on the forward pass's chunks (multiple shooting).

    Given the Jacobians at the solution, ``lambda_t = g_t + J_{t+1}^T lambda_{t+1}`` is a *linear* recurrence
    backwards in time, so the forward's multiple shooting applies as is. With the chunks of :class:`_ChunkedSolve`,
    the unknowns are the chunk *end values* ``e_k``: what flows into the last step of chunk ``k`` from the first step
    of chunk ``k + 1`` (``e_{K-1} = 0``). A sweep integrates every chunk exactly backwards from its end value, one VJP
    of the cell per slab on all chunks at once, and yields every chunk's outflow ``w_k = J_{first,k}^T
    lambda_{first,k}``. The trajectory is consistent when ``e_k = w_{k+1}``. ``w_k`` is affine in ``e_k`` with slope
    ``P_k^T``, the transposed forward chunk transition, so the boundary system is the reverse linear recurrence

        e_k = P_{k+1}^T e_{k+1} + (w_{k+1} - P_{k+1}^T e'_{k+1}),

    solved by the parallel scan over chunks. The forward's ``P`` serves as preconditioner: exact products of the
    Jacobians at the solution in Newton mode (one scan, then one checking sweep), diagonal products in quasi mode
    (iterated; a few dozen steps make them tiny for contractive cells, so one scan usually suffices there too).
    Every iteration makes at least one more chunk exact, counted from the end, and the answer is accepted on the
    adjoint's own residual, which is zero inside chunks by construction and ``|e_k - w_{k+1}|`` at the boundaries.
    """

    def __init__(self, problem: _Problem, h_prev: Tensor, chunks: _Chunks) -> None:
        B, T, H = problem.shape
        I = problem.x.shape[-1]  # noqa: E741
        self.problem, self.T = problem, T
        self.C, self.K = chunks.steps, chunks.transitions.shape[1]
        x = _to_chunks(problem.x.view(B, T, I), self.C, self.K)
        states = _to_chunks(h_prev, self.C, self.K)
        rows = B * self.K
        self.vjps = [
            problem.vjp(states[:, :, c].reshape(rows, H), x[:, :, c].reshape(rows, I), check=c == 0)
            for c in range(self.C)
        ]
        # Chunk k's outflow feeds chunk k - 1: the transition of unknown e_k is P_{k+1}^T. The one of the last
        # unknown only ever meets the fixed zero end value e_{K-1}.
        A = chunks.transitions[:, 1:]
        self.A = A if problem.diagonal else A.transpose(-1, -2)
        self.ends = h_prev.new_zeros(B, self.K, H)
        # Past T (padding of the last chunk) the adjoint is exactly zero: g is zero-padded and nothing flows in.
        self.real_steps = T - (self.K - 1) * self.C

    def solve(self, grad: Tensor) -> Tensor:
        B, T, H = self.problem.shape
        g = _to_chunks(grad, self.C, self.K)
        lam = torch.empty_like(g, memory_format=torch.contiguous_format)
        residual = math.inf
        for iteration in range(self.problem.max_iters + 1):
            mismatch = self.sweep(g, lam)
            err = mismatch.abs().amax() if self.K > 1 else lam.new_zeros(())
            scale = lam.abs().amax()
            residual = float(err / scale) if scale > 0 else float(err)
            if err <= self.problem.tol * scale:
                return lam.view(B, self.K * self.C, H)[:, :T]
            if iteration == self.problem.max_iters:
                break
            # Residual-correction form of the Newton step: chunks that are already exact get a zero correction.
            correction = linear_recurrence(self.A, mismatch, reverse=True)
            self.ends[:, :-1] += torch.nan_to_num_(correction, nan=0.0, posinf=_CLAMP, neginf=-_CLAMP)
        raise self.problem.adjoint_error(residual)

    def sweep(self, g: Tensor, lam: Tensor) -> Tensor:
        """Integrate every chunk backwards from its end value into ``lam``; returns ``w_{k+1} - e_k``, ``[B, K-1, H]``."""
        B, K, C, H = lam.shape
        inflow = self.ends.view(B * K, H)
        for c in reversed(range(C)):
            slab = lam[:, :, c]
            torch.add(g[:, :, c], inflow.reshape(B, K, H), out=slab)
            inflow = self.vjps[c](slab.reshape(B * K, H))
            if c >= self.real_steps:  # a padded step's Jacobian may be non-finite: nothing may leak from it
                inflow = inflow.clone()  # (a VJP may hand back its argument or a tensor it keeps)
                inflow[K - 1 :: K] = 0
        return inflow.reshape(B, K, H)[:, 1:] - self.ends[:, :-1]


class _ImplicitAdjoint(torch.autograd.Function):
    """Identity on the solution ``h``; backward turns ``dL/dh`` into the adjoint ``lambda`` for ``z = cell(...)``."""

    @staticmethod
    def forward(ctx, z: Tensor, h: Tensor, problem: _Problem, h_prev: Tensor, chunks: _Chunks | None) -> Tensor:
        ctx.problem, ctx.h_prev, ctx.chunks = problem, h_prev, chunks
        return h.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        lam = ctx.problem.solve_adjoint(ctx.h_prev, grad.contiguous(), ctx.chunks)
        return lam, None, None, None, None


def _check_args(inputs: Tensor, h0: Tensor, mode: str, max_iters: int, tol: float | None) -> float:
    if not isinstance(inputs, Tensor) or inputs.dim() != 3:
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be a [B, T, I] tensor, got {shape}")
    if not inputs.is_floating_point():
        raise TypeError(f"inputs must be floating point, got {inputs.dtype}")
    if inputs.shape[1] == 0:
        raise ValueError("inputs has an empty time dimension (T = 0)")
    if not isinstance(h0, Tensor) or h0.dim() != 2 or h0.shape[0] != inputs.shape[0]:
        shape = tuple(h0.shape) if isinstance(h0, Tensor) else type(h0).__name__
        raise ValueError(f"h0 must be a [B, H] tensor with B = {inputs.shape[0]} (from inputs), got {shape}")
    if h0.dtype != inputs.dtype or h0.device != inputs.device:
        raise TypeError(
            f"h0 ({h0.dtype}, {h0.device}) and inputs ({inputs.dtype}, {inputs.device}) must share dtype and device"
        )
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be a positive int, got {max_iters!r}")
    if tol is None:
        if inputs.dtype not in DEFAULT_TOL:
            raise TypeError(f"no default tolerance for {inputs.dtype}; pass tol=")
        return DEFAULT_TOL[inputs.dtype]
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    return float(tol)


def deer_rnn(
    cell: Cell,
    inputs: Tensor,
    h0: Tensor,
    *,
    mode: str = "newton",
    max_iters: int = 100,
    tol: float | None = None,
    return_info: bool = False,
    cell_and_diagonal: CellAndDiagonal | None = None,
    cell_vjp: CellVJP | None = None,
) -> Tensor | tuple[Tensor, DEERInfo]:
    """Run ``h_t = cell(h_{t-1}, x_t)`` over a whole sequence in parallel (DEER / quasi-DEER).

    Example::

        cell = lambda h, x: torch.tanh(x @ W_x.T + h @ W_h.T)
        hs = deer_rnn(cell, inputs, h0)                      # == the sequential loop, [B, T, H]
        hs, info = deer_rnn(cell, inputs, h0, mode="quasi", return_info=True)

    Args:
        cell: ``cell(h_prev [N, H], x_t [N, I]) -> h_t [N, H]``, any differentiable, deterministic torch function
            (an ``nn.Module`` or a closure) that treats batch rows independently: DEER calls it on many (sequence,
            step) rows at once (all ``B*T``, or on CPU one step of every chunk) and under ``torch.func.vmap`` /
            ``jvp`` for Jacobians (no in-place updates of captured state, no dropout, no batch statistics).
        inputs: ``[B, T, I]``. Precomputing input projections outside the cell makes every iteration cheaper.
        h0: initial state ``[B, H]`` (it fixes the state size ``H``).
        mode: ``"newton"`` (full Jacobians, quadratic convergence, ``O(T H^2)`` memory and ``O(T H^3)`` work per
            iteration) or ``"quasi"`` (Jacobian diagonals: elementwise scan, ``O(T H)`` memory, more iterations).
        max_iters: the most linearise-and-scan steps. ``T`` steps always suffice in exact arithmetic (on CPU, the
            number of chunks: at most ``T``).
        tol: accepted scaled residual ``max_t |h_t - cell(h_{t-1}, x_t)| / (1 + max_t |h_t|)``; default per dtype
            (:data:`DEFAULT_TOL`: 1e-10 float64, 1e-5 float32). The backward adjoint solve uses the same ``tol``
            relative to the adjoint's size.
        return_info: also return a :class:`DEERInfo`.
        cell_and_diagonal: ``mode="quasi"`` only: an optional fused ``(h_prev, x_t) -> (cell(h_prev, x_t),
            diag(d cell / d h_prev))``, e.g. :func:`gru_cell_and_diagonal`. Without it the diagonal costs ``H``
            forward-mode probes of the cell (see :func:`_transition`); with it, about one cell call. The diagonal
            only steers the iteration: the returned trajectory is computed and checked with ``cell`` itself, gradients
            use ``cell``'s exact VJP, so an inexact diagonal can only cost iterations, never accuracy.
        cell_vjp: optional fused ``(h_prev, x_t) -> (v -> v^T d cell / d h_prev)`` for the backward pass, e.g.
            :func:`gru_cell_vjp`: the products with transposed Jacobians that the adjoint solve repeats, without
            autograd's per-call bookkeeping. It is compared with autograd on a few rows before use (a mismatch
            raises ``ValueError``); gradients for inputs, ``h0`` and parameters still come from autograd on ``cell``.

    Returns:
        ``hs [B, T, H]`` (``hs[:, t]`` is the state after step ``t``), and a :class:`DEERInfo` (iterations, final
        residual) when ``return_info``.

    Raises:
        DEERConvergenceError: the tolerance was not met within ``max_iters`` (forward, or adjoint in backward);
            a non-converged trajectory is never returned.
        ValueError, TypeError: on malformed shapes, dtypes, a cell output unlike ``h_prev``, or bad options.

    Gradients flow to ``inputs``, ``h0`` and every tensor ``cell`` reads that requires grad (module parameters
    and closure captures alike: they are found by autograd through one extra parallel call of ``cell`` at the
    solution, so no parameter list is needed). They are exact up to ``tol`` (implicit differentiation); double
    backward is not supported.
    """
    tol = _check_args(inputs, h0, mode, max_iters, tol)
    if cell_and_diagonal is not None and mode != "quasi":
        raise ValueError("cell_and_diagonal only applies to mode='quasi' (Newton needs full Jacobians)")
    B, T, _ = inputs.shape
    H = h0.shape[1]
    x_rows = inputs.detach().reshape(B * T, -1)
    problem = _Problem(cell, cell_and_diagonal, x_rows, (B, T, H), mode == "quasi", tol, max_iters, cell_vjp)
    with torch.no_grad():
        h, info, chunks = problem.solve(h0.detach())
    if torch.is_grad_enabled():
        # One parallel cell call at the solution, h_prev detached except h0: autograd then owns the local
        # derivatives (inputs, h0, parameters) and the custom function supplies the recurrence's adjoint.
        h_prev = _shift(h, h0.detach())
        z = cell(_shift(h, h0).reshape(B * T, H), inputs.reshape(B * T, -1))
        if z.requires_grad:
            h = _ImplicitAdjoint.apply(z.reshape(B, T, H), h, problem, h_prev, chunks)
    return (h, info) if return_info else h


def _gru_gates(
    h: Tensor, gates_x: Tensor, weight_hh: Tensor, bias_hh: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``r, z, n`` and the hidden projection of the new-gate ``gh_n`` of ``torch.nn.GRU``."""
    H = h.shape[-1]
    # split/chunk rather than slices: their backward is one concatenation, where every slice's backward would
    # allocate and zero a full-width gradient (a third of the cost of a GRU VJP on cache-sized slabs).
    gh_rz, h_n = F.linear(h, weight_hh, bias_hh).split([2 * H, H], dim=-1)
    gx_rz, gx_n = gates_x.split([2 * H, H], dim=-1)
    r, z = torch.sigmoid(gx_rz + gh_rz).chunk(2, dim=-1)
    n = torch.tanh(torch.addcmul(gx_n, r, h_n))
    return r, z, n, h_n


def gru_cell(h: Tensor, gates_x: Tensor, weight_hh: Tensor, bias_hh: Tensor | None) -> Tensor:
    """One GRU step in ``torch.nn.GRU``'s convention, with the input projection ``x W_ih^T + b_ih`` precomputed.

    ``r = sigmoid(gx_r + gh_r)``, ``z = sigmoid(gx_z + gh_z)``, ``n = tanh(gx_n + r * gh_n)``,
    ``h' = (1 - z) * n + z * h`` with ``gh = h W_hh^T + b_hh`` and gate order ``(r, z, n)``.
    """
    _, z, n, _ = _gru_gates(h, gates_x, weight_hh, bias_hh)
    return torch.addcmul(n, h - n, z)


def gru_cell_and_diagonal(
    h: Tensor, gates_x: Tensor, weight_hh: Tensor, bias_hh: Tensor | None
) -> tuple[Tensor, Tensor]:
    """:func:`gru_cell` and the diagonal of its Jacobian ``d h' / d h`` in one pass (for quasi-DEER; no autograd).

    With ``w_r, w_z, w_n`` the diagonals of the three ``H x H`` blocks of ``weight_hh`` and ``gh_n = (h W_hh^T +
    b_hh)_n``: ``dh'_i/dh_i = z_i + (1 - z_i) [(1 - n_i^2) r_i (w_n,i + (1 - r_i) gh_n,i w_r,i) + (h_i - n_i) z_i
    w_z,i]``. Intermediates are updated in place: on large ``[B*T, H]`` batches allocation, not arithmetic,
    dominates the cost of elementwise ops on CPU.
    """
    H = h.shape[-1]
    w_r, w_z, w_n = (weight_hh[k * H : (k + 1) * H].diagonal() for k in range(3))
    gates = F.linear(h, weight_hh, bias_hh)
    h_n = gates[..., 2 * H :]
    rz = gates[..., : 2 * H].add_(gates_x[..., : 2 * H]).sigmoid_()
    r, z = rz[..., :H], rz[..., H:]
    n = torch.addcmul(gates_x[..., 2 * H :], r, h_n).tanh_()
    h_minus_n = h - n
    out = torch.addcmul(n, h_minus_n, z)
    dn = torch.rsub(r, 1).mul_(h_n).mul_(w_r).add_(w_n).mul_(r).mul_(n.mul_(n).neg_().add_(1))
    diag = torch.rsub(z, 1).mul_(h_minus_n.mul_(z).mul_(w_z).add_(dn)).add_(z)
    return out, diag


def gru_cell_vjp(h: Tensor, gates_x: Tensor, weight_hh: Tensor, bias_hh: Tensor | None) -> Callable[[Tensor], Tensor]:
    """``v -> v^T (d gru_cell / d h)`` for every row of ``h [N, H]`` (the backward pass of DEER; no autograd).

    With ``r, z, n, gh_n`` as in :func:`gru_cell`, ``a_n = (1 - z)(1 - n^2)``, ``a_z = z (1 - z)(h - n)`` and
    ``a_r = a_n gh_n r (1 - r)``: ``v^T J = z v + [v a_r, v a_z, v a_n r] W_hh``. The factors are computed once
    here; every product then costs two elementwise products and one matrix product, where autograd replays the
    whole backward graph of the cell.
    """
    with torch.no_grad():
        r, z, n, h_n = _gru_gates(h, gates_x, weight_hh, bias_hh)
        a_n = torch.rsub(z, 1).mul_(n.square().neg_().add_(1))
        factors = torch.stack([a_n * h_n * r * torch.rsub(r, 1), z * torch.rsub(z, 1) * (h - n), a_n * r], dim=-2)
        weight = weight_hh.detach()

    def vjp(v: Tensor) -> Tensor:
        return torch.addmm(v * z, (factors * v.unsqueeze(-2)).flatten(-2), weight)

    return vjp


class ParallelGRU(nn.Module):
    """A batch-first ``torch.nn.GRU`` evaluated with DEER: same parameters, state-dict keys, inputs and outputs.

    ``ParallelGRU.from_gru(gru)`` (or ``load_state_dict(gru.state_dict())``) reproduces ``gru`` within the DEER
    tolerance. Supports ``num_layers >= 1`` (layers are evaluated one after the other, each in parallel over time),
    ``bias``, inter-layer ``dropout``, ``batch_first`` either way, unbatched inputs and an optional ``h0``.
    Bidirectional GRUs are not supported.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout: as ``torch.nn.GRU`` (``batch_first``
            defaults to ``True`` here).
        mode, max_iters, tol: passed to :func:`deer_rnn`.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = True,
        dropout: float = 0.0,
        bidirectional: bool = False,
        *,
        mode: str = "quasi",
        max_iters: int = 100,
        tol: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if bidirectional:
            raise ValueError("ParallelGRU does not support bidirectional=True")
        if num_layers < 1 or hidden_size < 1 or input_size < 1:
            raise ValueError("input_size, hidden_size and num_layers must be positive")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, dropout
        self.mode, self.max_iters, self.tol = mode, max_iters, tol
        factory = {"device": device, "dtype": dtype}
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else hidden_size
            self.register_parameter(
                f"weight_ih_l{layer}", nn.Parameter(torch.empty(3 * hidden_size, layer_in, **factory))
            )
            self.register_parameter(
                f"weight_hh_l{layer}", nn.Parameter(torch.empty(3 * hidden_size, hidden_size, **factory))
            )
            if bias:
                self.register_parameter(f"bias_ih_l{layer}", nn.Parameter(torch.empty(3 * hidden_size, **factory)))
                self.register_parameter(f"bias_hh_l{layer}", nn.Parameter(torch.empty(3 * hidden_size, **factory)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``torch.nn.GRU``'s initialisation: every weight uniform in ``±1/sqrt(hidden_size)``."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    @classmethod
    def from_gru(cls, gru: nn.GRU, **deer_kwargs) -> ParallelGRU:
        """A ``ParallelGRU`` with ``gru``'s configuration and a copy of its weights."""
        if not isinstance(gru, nn.GRU):
            raise TypeError(f"expected torch.nn.GRU, got {type(gru).__name__}")
        weight = gru.weight_ih_l0
        module = cls(
            gru.input_size,
            gru.hidden_size,
            gru.num_layers,
            gru.bias,
            gru.batch_first,
            gru.dropout,
            gru.bidirectional,
            device=weight.device,
            dtype=weight.dtype,
            **deer_kwargs,
        )
        module.load_state_dict(gru.state_dict())
        return module

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, bias={self.bias}, "
            f"batch_first={self.batch_first}, dropout={self.dropout}, mode={self.mode!r}"
        )

    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Same contract as ``torch.nn.GRU.forward``.

        Args:
            input: ``[B, T, input_size]`` (``[T, B, input_size]`` if not ``batch_first``) or unbatched
                ``[T, input_size]``.
            hx: initial states ``[num_layers, B, hidden_size]`` (``[num_layers, hidden_size]`` unbatched); zeros if
                ``None``.

        Returns:
            ``(output, h_n)``: the last layer's states for every step, shaped like ``input`` with ``hidden_size``
            features, and every layer's final state ``[num_layers, B, hidden_size]``.
        """
        if input.dim() not in (2, 3) or input.shape[-1] != self.input_size:
            raise ValueError(
                f"input must be [B, T, {self.input_size}] (or unbatched [T, {self.input_size}]), got {tuple(input.shape)}"
            )
        unbatched = input.dim() == 2
        x = input.unsqueeze(0) if unbatched else (input if self.batch_first else input.transpose(0, 1))
        B = x.shape[0]
        state_shape = (self.num_layers, self.hidden_size) if unbatched else (self.num_layers, B, self.hidden_size)
        if hx is None:
            hx = x.new_zeros(self.num_layers, B, self.hidden_size)
        elif hx.shape != state_shape:
            raise ValueError(f"hx must have shape {state_shape}, got {tuple(hx.shape)}")
        elif unbatched:
            hx = hx.unsqueeze(1)
        finals = []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)
            weight_hh = getattr(self, f"weight_hh_l{layer}")
            bias_hh = getattr(self, f"bias_hh_l{layer}") if self.bias else None
            bias_ih = getattr(self, f"bias_ih_l{layer}") if self.bias else None
            gates_x = F.linear(x, getattr(self, f"weight_ih_l{layer}"), bias_ih)
            fused = partial(gru_cell_and_diagonal, weight_hh=weight_hh, bias_hh=bias_hh)
            vjp = partial(gru_cell_vjp, weight_hh=weight_hh, bias_hh=bias_hh)
            x = deer_rnn(
                partial(gru_cell, weight_hh=weight_hh, bias_hh=bias_hh),
                gates_x,
                hx[layer],
                mode=self.mode,
                max_iters=self.max_iters,
                tol=self.tol,
                cell_and_diagonal=fused if self.mode == "quasi" else None,
                cell_vjp=vjp,
            )
            finals.append(x[:, -1])
        h_n = torch.stack(finals)
        if unbatched:
            return x.squeeze(0), h_n.squeeze(1)
        return (x if self.batch_first else x.transpose(0, 1)), h_n
