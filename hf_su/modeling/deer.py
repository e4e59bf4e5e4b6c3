"""DEER: evaluate a non-linear RNN in parallel over the sequence length (Lim et al. 2023; Su, kexue.fm 9783).

The whole trajectory ``h_1..h_T`` of ``h_t = f(h_{t-1}, x_t)`` is the root of ``h_t - f(h_{t-1}, x_t) = 0``.
Linearising ``f`` around the current guess gives a *linear* recurrence

    h_t = J_t h_{t-1} + (f(h'_{t-1}, x_t) - J_t h'_{t-1}),      J_t = df/dh (h'_{t-1}, x_t)

that a parallel associative scan solves in ``O(log T)`` depth (:mod:`hf_su.modeling.scan`). Iterating is Newton's
method on the whole sequence (``mode="newton"``, full ``H x H`` Jacobians, quadratic convergence near the
solution, ``O(T H^3)`` scan work). ``mode="quasi"`` keeps only the Jacobians' diagonals (quasi-DEER, Gonzalez et al.
2024): an elementwise scan, ``O(T H)`` memory, more but cheaper iterations. Both converge to the same fixed point and
both are exact after at most ``T`` iterations (each iteration fixes at least one more leading step).

Gradients use implicit differentiation at the solution: the adjoint recurrence
``lambda_t = g_t + J_{t+1}^T lambda_{t+1}`` is solved by the same scan (backwards in time), then ``lambda`` is
back-propagated through one parallel call of the cell, which delivers the gradients for the inputs, ``h0`` and
every tensor the cell uses. Nothing is back-propagated through the iterations.
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

from .scan import fold_initial_state_, linear_recurrence

__all__ = ["DEERConvergenceError", "DEERInfo", "ParallelGRU", "deer_rnn", "gru_cell", "gru_cell_and_diagonal"]

Cell = Callable[[Tensor, Tensor], Tensor]
CellAndDiagonal = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

MODES = ("newton", "quasi")

# Accepted scaled residual max_t |h_t - f(h_{t-1}, x_t)| / (1 + max_t |h_t|). About a hundred ulps: reachable in
# spite of the rounding of long scans, and tight enough that the trajectory matches a sequential loop (float32
# <= 1e-4, float64 <= 1e-8 for contractive cells, whose errors are at most residual / (1 - contraction)).
DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}

# Iterates are kept finite between Newton steps (as the reference does for RNNs): a step that overflows still
# leaves its exact prefix intact, so the "one more exact step per iteration" guarantee survives. The answer itself
# is only ever accepted on its residual.
_CLAMP = 1e8

# Elements (rows x (H + I)) per row block of the cell calls on CPU: about a MiB of operands, to stay in cache.
_CPU_BLOCK_ELEMENTS = 1 << 18

# Elements per chunk of the batched Jacobian probes (H probes x rows x H outputs), to bound memory.
_PROBE_BUDGET = 1 << 23


class DEERInfo(NamedTuple):
    """Convergence report of :func:`deer_rnn`."""

    iterations: int
    """Newton (or quasi-Newton) steps taken, i.e. parallel linear solves; 0 when the initial guess already fits."""
    residual: float
    """Scaled residual ``max_t |h_t - cell(h_{t-1}, x_t)| / (1 + max_t |h_t|)`` of the returned trajectory."""


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
    a GRU. Quasi mode saves the ``O(H^3)`` matrix scan and the ``O(T H^2)`` Jacobian memory, not the probes.
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


@dataclass
class _Problem:
    """One RNN evaluation, flattened to ``N = B*T`` independent rows for the parallel cell calls."""

    cell: Cell
    cell_and_diagonal: CellAndDiagonal | None
    x: Tensor  # [N, I]
    shape: tuple[int, int, int]  # B, T, H
    diagonal: bool
    tol: float
    max_iters: int

    def rows(self, h: Tensor) -> Tensor:
        return h.reshape(-1, self.shape[2])

    def steps(self, h: Tensor) -> Tensor:
        return h.reshape(self.shape)

    def value(self, h_prev: Tensor, h: Tensor | None = None) -> tuple[Tensor, Tensor | None, float]:
        """``cell`` at every step ``[B, T, H]``; the diagonal transitions when a fused function gives them; and the
        scaled residual against ``h`` (``inf`` without ``h``).

        Rows are independent, so on CPU they are processed in cache-sized blocks: the dozen elementwise passes of a
        cell then run on cache-resident data instead of streaming ``[B*T, H]`` arrays through memory each time.
        """
        rows = self.rows(h_prev)
        current = None if h is None else self.rows(h)
        n_rows, H = rows.shape
        block = max(1, _CPU_BLOCK_ELEMENTS // (H + self.x.shape[1])) if rows.device.type == "cpu" else n_rows
        f_val = torch.empty_like(rows)
        J = torch.empty_like(rows) if self.cell_and_diagonal is not None else None
        err = rows.new_zeros(())
        for start in range(0, n_rows, block):
            part = slice(start, start + block)
            if J is None:
                f_part = _evaluate(self.cell, rows[part], self.x[part])
            else:
                f_part, J[part] = self._fused(rows[part], self.x[part])
            f_val[part] = f_part
            if current is not None:
                err = torch.maximum(err, (f_part - current[part]).abs_().amax())
        residual = math.inf
        if current is not None:
            value = float(err / (1 + torch.maximum(current.amax(), current.amin().neg())))
            residual = value if math.isfinite(value) else math.inf
        return self.steps(f_val), (None if J is None else self.steps(J)), residual

    def _fused(self, h_prev: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.cell_and_diagonal(h_prev, x)
        if not isinstance(out, tuple) or len(out) != 2:
            raise ValueError("cell_and_diagonal must return a pair (cell(h_prev, x_t), diagonal of d cell / d h_prev)")
        _check_like(out[0], h_prev, "cell_and_diagonal(h_prev, x_t)[0]")
        _check_like(out[1], h_prev, "cell_and_diagonal(h_prev, x_t)[1]")
        return out

    def transitions(self, h_prev: Tensor) -> Tensor:
        """Jacobians (or their diagonals) at ``h_prev``, ``[B, T, H(, H)]``."""
        if self.cell_and_diagonal is not None:
            return self.value(h_prev)[1]
        J = _transition(self.cell, self.rows(h_prev), self.x, self.diagonal)
        return J.reshape(*self.shape, *J.shape[2:])

    def solve(self, h0: Tensor) -> tuple[Tensor, DEERInfo]:
        B, T, H = self.shape
        h = h0.unsqueeze(1).expand(B, T, H).contiguous()  # initial guess, as in the reference
        residual = math.inf
        for iteration in range(self.max_iters + 1):
            h_prev = _shift(h, h0)
            f_val, J, residual = self.value(h_prev, h)
            if residual <= self.tol:
                if self.cell_and_diagonal is not None:
                    self._check_fused_value(h_prev, f_val)
                return h, DEERInfo(iteration, residual)
            if iteration == self.max_iters:
                break
            if J is None:
                J = self.transitions(h_prev)
            if self.diagonal:
                offset = torch.addcmul(f_val, J, h_prev, value=-1)
            else:
                offset = f_val - torch.matmul(J, h_prev.unsqueeze(-1)).squeeze(-1)
            h = linear_recurrence(J, fold_initial_state_(J, offset, h0))
            torch.nan_to_num_(h, nan=0.0, posinf=_CLAMP, neginf=-_CLAMP)
        raise DEERConvergenceError(
            f"DEER did not converge in max_iters={self.max_iters} iterations (mode="
            f"{'quasi' if self.diagonal else 'newton'}): scaled residual {residual:.3g} > tol {self.tol:.3g}. "
            "Raise max_iters (at most T iterations are ever needed), try mode='newton', or loosen tol.",
            self.max_iters,
            residual,
        )

    def _check_fused_value(self, h_prev: Tensor, fused: Tensor) -> None:
        # The fused function only speeds things up; the answer must be the cell's own fixed point.
        if _Problem(self.cell, None, self.x, self.shape, self.diagonal, self.tol, 1).value(h_prev, fused)[2] > self.tol:
            raise ValueError("cell_and_diagonal(h_prev, x_t)[0] disagrees with cell(h_prev, x_t)")

    def solve_adjoint(self, h_prev: Tensor, grad: Tensor) -> Tensor:
        """``lambda`` with ``lambda_t = g_t + J_{t+1}^T lambda_{t+1}`` (``lambda_T = g_T``), Jacobians at ``h_prev``.

        Exact transposed-Jacobian products come from one reusable VJP of the parallel cell call; the scan is
        preconditioned with the mode's transitions (exact for Newton: one solve, one check; diagonals for quasi:
        iterated like the forward pass).
        """
        _, vjp = torch.func.vjp(lambda h: self.cell(h, self.x), self.rows(h_prev))
        M = self.transitions(h_prev)
        # lambda_t couples to step t+1: shift the transitions one step earlier; the last one meets a zero end state.
        A = torch.roll(M if self.diagonal else M.transpose(-1, -2), shifts=-1, dims=1)
        lam = linear_recurrence(A, grad, reverse=True)
        residual = math.inf
        for iteration in range(1, self.max_iters + 1):
            JT_lam = self.steps(vjp(self.rows(lam))[0])
            residual_t = grad - lam
            residual_t[:, :-1] += JT_lam[:, 1:]
            err, scale = residual_t.abs().amax(), lam.abs().amax()
            residual = float(err / scale) if scale > 0 else float(err)
            if err <= self.tol * scale:
                return lam
            if iteration < self.max_iters:
                lam = lam + linear_recurrence(A, residual_t, reverse=True)
        raise DEERConvergenceError(
            f"DEER backward: the adjoint solve did not converge in max_iters={self.max_iters} iterations "
            f"(relative residual {residual:.3g} > tol {self.tol:.3g}). Raise max_iters or try mode='newton'.",
            self.max_iters,
            residual,
        )


class _ImplicitAdjoint(torch.autograd.Function):
    """Identity on the solution ``h``; backward turns ``dL/dh`` into the adjoint ``lambda`` for ``z = cell(...)``."""

    @staticmethod
    def forward(ctx, z: Tensor, h: Tensor, problem: _Problem, h_prev: Tensor) -> Tensor:
        ctx.problem, ctx.h_prev = problem, h_prev
        return h.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        return ctx.problem.solve_adjoint(ctx.h_prev, grad.contiguous()), None, None, None


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
) -> Tensor | tuple[Tensor, DEERInfo]:
    """Run ``h_t = cell(h_{t-1}, x_t)`` over a whole sequence in parallel (DEER / quasi-DEER).

    Example::

        cell = lambda h, x: torch.tanh(x @ W_x.T + h @ W_h.T)
        hs = deer_rnn(cell, inputs, h0)                      # == the sequential loop, [B, T, H]
        hs, info = deer_rnn(cell, inputs, h0, mode="quasi", return_info=True)

    Args:
        cell: ``cell(h_prev [N, H], x_t [N, I]) -> h_t [N, H]``, any differentiable, deterministic torch function
            (an ``nn.Module`` or a closure) that treats batch rows independently: DEER calls it on many (sequence,
            step) rows at once (all ``B*T``, or cache-sized blocks of them on CPU) and under ``torch.func.vmap`` /
            ``jvp`` for Jacobians (no in-place updates of captured state, no dropout, no batch statistics).
        inputs: ``[B, T, I]``. Precomputing input projections outside the cell makes every iteration cheaper.
        h0: initial state ``[B, H]`` (it fixes the state size ``H``).
        mode: ``"newton"`` (full Jacobians, quadratic convergence, ``O(T H^2)`` memory and ``O(T H^3)`` work per
            iteration) or ``"quasi"`` (Jacobian diagonals: elementwise scan, ``O(T H)`` memory, more iterations).
        max_iters: the most linearise-and-scan steps. ``T`` steps always suffice in exact arithmetic.
        tol: accepted scaled residual ``max_t |h_t - cell(h_{t-1}, x_t)| / (1 + max_t |h_t|)``; default per dtype
            (:data:`DEFAULT_TOL`: 1e-10 float64, 1e-5 float32). The backward adjoint solve uses the same ``tol``
            relative to the adjoint's size.
        return_info: also return a :class:`DEERInfo`.
        cell_and_diagonal: ``mode="quasi"`` only: an optional fused ``(h_prev, x_t) -> (cell(h_prev, x_t),
            diag(d cell / d h_prev))``, e.g. :func:`gru_cell_and_diagonal`. Without it the diagonal costs ``H``
            forward-mode probes of the cell (see :func:`_transition`); with it, about one cell call. The diagonal
            only steers the iteration: the returned trajectory is checked against ``cell`` itself and gradients
            use ``cell``'s exact VJP, so an inexact diagonal can only cost iterations, never accuracy.

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
    problem = _Problem(cell, cell_and_diagonal, x_rows, (B, T, H), mode == "quasi", tol, max_iters)
    with torch.no_grad():
        h, info = problem.solve(h0.detach())
    if torch.is_grad_enabled():
        # One parallel cell call at the solution, h_prev detached except h0: autograd then owns the local
        # derivatives (inputs, h0, parameters) and the custom function supplies the recurrence's adjoint.
        h_prev = _shift(h, h0.detach())
        z = cell(_shift(h, h0).reshape(B * T, H), inputs.reshape(B * T, -1))
        if z.requires_grad:
            h = _ImplicitAdjoint.apply(z.reshape(B, T, H), h, problem, h_prev)
    return (h, info) if return_info else h


def _gru_gates(
    h: Tensor, gates_x: Tensor, weight_hh: Tensor, bias_hh: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``r, z, n`` and the hidden projection of the new-gate ``gh_n`` of ``torch.nn.GRU``."""
    H = h.shape[-1]
    gates_h = F.linear(h, weight_hh, bias_hh)
    rz = torch.sigmoid(gates_x[..., : 2 * H] + gates_h[..., : 2 * H])
    r, z = rz[..., :H], rz[..., H:]
    h_n = gates_h[..., 2 * H :]
    n = torch.tanh(torch.addcmul(gates_x[..., 2 * H :], r, h_n))
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
            x = deer_rnn(
                partial(gru_cell, weight_hh=weight_hh, bias_hh=bias_hh),
                gates_x,
                hx[layer],
                mode=self.mode,
                max_iters=self.max_iters,
                tol=self.tol,
                cell_and_diagonal=fused if self.mode == "quasi" else None,
            )
            finals.append(x[:, -1])
        h_n = torch.stack(finals)
        if unbatched:
            return x.squeeze(0), h_n.squeeze(1)
        return (x if self.batch_first else x.transpose(0, 1)), h_n
