"""DEER / quasi-DEER: the parallel scan, deer_rnn against sequential loops (values and gradients), ParallelGRU."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

import hf_su.modeling.deer as deer_module
from hf_su.modeling.deer import (
    DEFAULT_TOL,
    DEERConvergenceError,
    ParallelGRU,
    deer_rnn,
    gru_cell,
    gru_cell_and_diagonal,
    gru_cell_vjp,
)
from hf_su.modeling.scan import linear_recurrence

F64 = torch.float64
MODES = ("newton", "quasi")
LENGTHS = (1, 7, 64, 100)
# The acceptance tolerances against the sequential loop.
OUTPUT_ATOL = {torch.float64: 1e-8, torch.float32: 1e-4}
CPU_CHUNK_DEFAULTS = {"_CHUNK_STEPS": deer_module._CHUNK_STEPS, "_CPU_BLOCK_ELEMENTS": deer_module._CPU_BLOCK_ELEMENTS}


@pytest.fixture(autouse=True)
def one_step_chunks(monkeypatch):
    """Most tests check DEER itself: one step per chunk, the paper's algorithm (and the one used on accelerators).

    The CPU's multi-step chunks (multiple shooting) are tested on their own below, with the `small_chunks` fixture.
    """
    monkeypatch.setattr(deer_module, "_CHUNK_STEPS", 1)


def sequential(cell, inputs: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """The reference: the plain Python loop, differentiated by ordinary back-propagation."""
    h, out = h0, []
    for t in range(inputs.shape[1]):
        h = cell(h, inputs[:, t])
        out.append(h)
    return torch.stack(out, dim=1)


def tanh_rnn(input_size: int, hidden: int, dtype: torch.dtype, gain: float = 0.9):
    """A closure cell ``tanh(x W_x^T + h W_h^T + b)``; its weights are captured tensors, not module parameters."""
    w_x = torch.randn(hidden, input_size, dtype=dtype) / input_size**0.5
    w_h = (gain * torch.randn(hidden, hidden, dtype=dtype) / hidden**0.5).requires_grad_()
    b = (0.1 * torch.randn(hidden, dtype=dtype)).requires_grad_()

    def cell(h, x):
        return torch.tanh(x @ w_x.T + h @ w_h.T + b)

    return cell, [w_h, b]


def gru_module_cell(input_size: int, hidden: int, dtype: torch.dtype):
    """torch's own nn.GRUCell (an independent GRU implementation), as an ``(h, x)`` cell."""
    module = nn.GRUCell(input_size, hidden, dtype=dtype)
    return (lambda h, x: module(x, h)), list(module.parameters())


CELLS = {"tanh": tanh_rnn, "gru": gru_module_cell}


def make_case(kind: str, dtype: torch.dtype, T: int, B: int = 2, I: int = 3, H: int = 5):  # noqa: E741
    cell, params = CELLS[kind](I, H, dtype)
    inputs = torch.randn(B, T, I, dtype=dtype)
    h0 = 0.5 * torch.randn(B, H, dtype=dtype)
    return cell, params, inputs, h0


def assert_same_gradients(ours: nn.Module, gru: nn.GRU, x: torch.Tensor, hx: torch.Tensor) -> None:
    """Gradients of a loss on the outputs w.r.t. inputs, initial state and parameters match ``nn.GRU``'s (float64)."""
    x, hx = x.detach().requires_grad_(True), hx.detach().requires_grad_(True)
    expected = torch.autograd.grad(gru(x, hx)[0].square().sum(), [x, hx, *gru.parameters()])
    got = torch.autograd.grad(ours(x, hx)[0].square().sum(), [x, hx, *ours.parameters()])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-8)


# ----------------------------------------------------------------------------------------------- scan


@pytest.mark.parametrize("diagonal", [True, False], ids=["diagonal", "matrix"])
@pytest.mark.parametrize("T", [1, 2, 5, 16, 37])
def test_linear_recurrence_matches_loop(diagonal, T):
    B, H = 3, 4
    A = 0.6 * torch.randn(B, T, H, dtype=F64) if diagonal else 0.4 * torch.randn(B, T, H, H, dtype=F64)
    b, h0 = torch.randn(B, T, H, dtype=F64), torch.randn(B, H, dtype=F64)

    def step(t, h):
        return (A[:, t] * h if diagonal else (A[:, t] @ h.unsqueeze(-1)).squeeze(-1)) + b[:, t]

    h, forward = h0, []
    for t in range(T):
        h = step(t, h)
        forward.append(h)
    h, backward = h0, []
    for t in reversed(range(T)):
        h = step(t, h)
        backward.append(h)
    torch.testing.assert_close(linear_recurrence(A, b, h0), torch.stack(forward, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        linear_recurrence(A, b, h0, reverse=True), torch.stack(backward[::-1], 1), rtol=1e-12, atol=1e-12
    )
    zero_start = linear_recurrence(A, b)
    torch.testing.assert_close(zero_start, linear_recurrence(A, b, torch.zeros_like(h0)), rtol=0, atol=0)


def test_linear_recurrence_rejects_bad_shapes():
    b = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="A must be"):
        linear_recurrence(torch.randn(2, 5, 4), b)
    with pytest.raises(ValueError, match="b must be"):
        linear_recurrence(torch.randn(2, 5), torch.randn(2, 5))
    with pytest.raises(ValueError, match="h0 must be"):
        linear_recurrence(torch.randn(2, 5, 3, 3), b, torch.randn(3, 3))


# ----------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", list(CELLS))
def test_outputs_match_sequential_loop(kind, mode, dtype):
    for T in LENGTHS:
        cell, _, inputs, h0 = make_case(kind, dtype, T)
        with torch.no_grad():
            expected = sequential(cell, inputs, h0)
            got, info = deer_rnn(cell, inputs, h0, mode=mode, return_info=True)
        assert got.shape == expected.shape and got.dtype == dtype
        assert (got - expected).abs().max() <= OUTPUT_ATOL[dtype], f"T={T}"
        # One step is one chunk, integrated exactly by the first sweep; longer sequences need linear solves.
        assert (info.iterations > 0) == (T > 1) and info.iterations <= T and info.residual <= DEFAULT_TOL[dtype]


def test_newton_converges_quadratically_and_quasi_needs_more_steps():
    cell, _, inputs, h0 = make_case("gru", F64, 200)
    with torch.no_grad():
        newton = deer_rnn(cell, inputs, h0, mode="newton", return_info=True)[1]
        quasi = deer_rnn(cell, inputs, h0, mode="quasi", return_info=True)[1]
    assert newton.iterations <= 8 < quasi.iterations


def test_at_most_T_iterations_even_for_an_expanding_cell():
    """Each step fixes one more leading state, so T iterations always suffice (here the cell is far from linear)."""
    T = 10
    cell, _ = tanh_rnn(3, 4, F64, gain=3.0)
    inputs, h0 = 2 * torch.randn(2, T, 3, dtype=F64), torch.randn(2, 4, dtype=F64)
    with torch.no_grad():
        for mode in MODES:
            got = deer_rnn(cell, inputs, h0, mode=mode, max_iters=T)
            torch.testing.assert_close(got, sequential(cell, inputs, h0), rtol=0, atol=1e-8)


def test_non_convergence_raises_instead_of_returning():
    cell, _, inputs, h0 = make_case("gru", torch.float32, 64)
    with pytest.raises(DEERConvergenceError, match="did not converge") as err:
        deer_rnn(cell, inputs, h0, mode="quasi", max_iters=2)
    assert err.value.iterations == 2 and err.value.residual > DEFAULT_TOL[torch.float32]


def test_explicit_tol_is_honoured():
    cell, _, inputs, h0 = make_case("tanh", F64, 50)
    with torch.no_grad():
        loose = deer_rnn(cell, inputs, h0, mode="quasi", tol=1e-3, return_info=True)[1]
        tight = deer_rnn(cell, inputs, h0, mode="quasi", tol=1e-13, return_info=True)[1]
    assert loose.residual <= 1e-3 and tight.residual <= 1e-13 and loose.iterations < tight.iterations


# ----------------------------------------------------------------------------------------------- chunked sweep


@pytest.fixture
def small_chunks(monkeypatch):
    """Multi-step chunks for short test sequences: with B=2, H=5, I=3 a slab budget of 64 elements allows 4 chunks.

    T=7 -> chunks of 2 steps (one padded step), T=64 -> 16 steps, T=100 -> 25 steps.
    """
    monkeypatch.setattr(deer_module, "_CHUNK_STEPS", 2)
    monkeypatch.setattr(deer_module, "_CPU_BLOCK_ELEMENTS", 64)


def test_chunking_fits_cpu_cache_and_is_plain_deer_elsewhere(monkeypatch):
    for name, value in CPU_CHUNK_DEFAULTS.items():
        monkeypatch.setattr(deer_module, name, value)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    C, K = deer_module._chunking(8, 16384, 16, 48, cpu)
    assert C * K >= 16384 > (C - 1) * K and K * 8 * (16 + 48) <= deer_module._CPU_BLOCK_ELEMENTS
    assert deer_module._chunking(8, 1000, 16, 48, cpu) == (
        deer_module._CHUNK_STEPS,
        -(-1000 // deer_module._CHUNK_STEPS),
    )
    assert deer_module._chunking(2, 5, 4, 3, cpu) == (5, 1)  # short: one chunk, integrated exactly by one sweep
    assert deer_module._chunking(8, 16384, 16, 48, cuda) == (1, 16384)


@pytest.mark.parametrize("mode", MODES)
def test_default_cpu_chunks_parallel_gru_matches_torch_gru(monkeypatch, mode):
    for name, value in CPU_CHUNK_DEFAULTS.items():
        monkeypatch.setattr(deer_module, name, value)
    T, H = 200, 6
    C, K = deer_module._chunking(2, T, H, 3 * H, torch.device("cpu"))
    assert C > 1 and K > 1 and C * K > T  # several chunks of several steps, the last one padded
    gru = nn.GRU(4, H, batch_first=True, dtype=F64)
    ours = ParallelGRU.from_gru(gru, mode=mode)
    x, hx = torch.randn(2, T, 4, dtype=F64), torch.randn(1, 2, H, dtype=F64)
    torch.testing.assert_close(ours(x, hx)[0], gru(x, hx)[0], rtol=0, atol=1e-8)
    assert_same_gradients(ours, gru, x, hx)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", list(CELLS))
def test_chunked_outputs_match_sequential_loop(kind, mode, dtype):
    for T in (7, 64, 100):
        cell, _, inputs, h0 = make_case(kind, dtype, T)
        C, K = deer_module._chunking(2, T, 5, 3, inputs.device)
        assert C > 1 and K == 4
        with torch.no_grad():
            expected = sequential(cell, inputs, h0)
            got, info = deer_rnn(cell, inputs, h0, mode=mode, return_info=True)
        assert (got - expected).abs().max() <= OUTPUT_ATOL[dtype], f"T={T}"
        assert 0 < info.iterations <= K and info.residual <= DEFAULT_TOL[dtype]


@pytest.mark.usefixtures("small_chunks")
def test_chunked_gradients_fused_path_and_at_most_one_iteration_per_chunk(monkeypatch):
    cell, params, inputs, h0 = make_case("gru", F64, 37)
    inputs.requires_grad_(True)
    leaves = [inputs, h0.requires_grad_(True), *params]
    expected = torch.autograd.grad(sequential(cell, inputs, h0).square().sum(), leaves)
    got = torch.autograd.grad(deer_rnn(cell, inputs, h0, mode="quasi").square().sum(), leaves)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-8)

    # An expanding cell: convergence comes only from "one more exact chunk per iteration" (4 chunks here).
    wild, _ = tanh_rnn(3, 5, F64, gain=3.0)
    inputs = 2 * torch.randn(2, 10, 3, dtype=F64)
    assert deer_module._chunking(2, 10, 5, 3, inputs.device) == (3, 4)
    with torch.no_grad():
        for mode in MODES:
            got = deer_rnn(wild, inputs, h0.detach(), mode=mode, max_iters=4)
            torch.testing.assert_close(got, sequential(wild, inputs, h0.detach()), rtol=0, atol=1e-8)

    # ParallelGRU's cell reads the 3H = 15 gate pre-activations: a larger slab budget gives it 4 chunks too.
    monkeypatch.setattr(deer_module, "_CPU_BLOCK_ELEMENTS", 4 * 2 * (5 + 15))
    assert deer_module._chunking(2, 37, 5, 15, torch.device("cpu")) == (10, 4)
    gru = nn.GRU(3, 5, batch_first=True, dtype=F64)
    x, hx = torch.randn(2, 37, 3, dtype=F64), torch.randn(1, 2, 5, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(ParallelGRU.from_gru(gru)(x, hx)[0], gru(x, hx)[0], rtol=0, atol=1e-8)


@pytest.fixture
def adjoint_sweeps(monkeypatch):
    """Counts the sweeps of the chunked adjoint; the plain-DEER adjoint must not run at all."""
    calls = []
    sweep = deer_module._ChunkedAdjoint.sweep

    def counted(self, *args):
        calls.append(self.K)
        return sweep(self, *args)

    def forbidden(*args):
        raise AssertionError("multi-step chunks must use the chunked adjoint")

    monkeypatch.setattr(deer_module._ChunkedAdjoint, "sweep", counted)
    monkeypatch.setattr(deer_module._Problem, "_stepwise_adjoint", forbidden)
    return calls


# (T, slab budget) -> (C, K) with B=2, H=5, I=3 and 2-step target chunks: padded tails, chunks that divide T, one
# chunk, many chunks.
CHUNKED_ADJOINT_CASES = {(7, 64): (2, 4), (100, 64): (25, 4), (64, 64): (16, 4), (2, 64): (2, 1), (33, 512): (2, 17)}


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", list(CELLS))
def test_chunked_adjoint_gradients_match_backprop_through_loop(kind, mode, monkeypatch, adjoint_sweeps):
    for (T, budget), (C, K) in CHUNKED_ADJOINT_CASES.items():
        monkeypatch.setattr(deer_module, "_CPU_BLOCK_ELEMENTS", budget)
        assert deer_module._chunking(2, T, 5, 3, torch.device("cpu")) == (C, K)
        cell, params, inputs, h0 = make_case(kind, F64, T)
        inputs.requires_grad_(True)
        h0.requires_grad_(True)
        weights = torch.randn(inputs.shape[0], T, h0.shape[1], dtype=F64)
        leaves = [inputs, h0, *params]
        expected = torch.autograd.grad((sequential(cell, inputs, h0) * weights).sum(), leaves)
        adjoint_sweeps.clear()
        got = torch.autograd.grad((deer_rnn(cell, inputs, h0, mode=mode) * weights).sum(), leaves)
        for name, g, e in zip(["inputs", "h0"] + [f"param{i}" for i in range(len(params))], got, expected):
            torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-8, msg=lambda m, n=name, t=T: f"{n} T={t}: {m}")
        # The boundary system is linear: one chunk needs one sweep; with exact chunk transitions (Newton) one scan
        # and one checking sweep; quasi at most one more exact chunk per scan.
        assert adjoint_sweeps and set(adjoint_sweeps) == {K}
        assert len(adjoint_sweeps) == (1 if K == 1 else 2) if mode == "newton" else 1 <= len(adjoint_sweeps) <= K + 1


@pytest.mark.usefixtures("small_chunks")
def test_chunked_adjoint_of_expanding_cell_fixes_one_chunk_per_iteration_and_raises_when_out_of_iterations(
    adjoint_sweeps,
):
    """Gain 3: the diagonal preconditioner is poor and chunk transitions are large; still <= K scans suffice."""
    cell, params = tanh_rnn(3, 5, F64, gain=3.0)
    inputs = (2 * torch.randn(2, 10, 3, dtype=F64)).requires_grad_()
    h0 = torch.randn(2, 5, dtype=F64, requires_grad=True)
    assert deer_module._chunking(2, 10, 5, 3, inputs.device) == (3, 4)
    leaves = [inputs, h0, *params]
    expected = torch.autograd.grad(sequential(cell, inputs, h0).sum(), leaves)
    for mode in MODES:
        adjoint_sweeps.clear()
        got = torch.autograd.grad(deer_rnn(cell, inputs, h0, mode=mode, max_iters=4).sum(), leaves)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-8)
        assert len(adjoint_sweeps) <= 5

    # h0 is a fixed point of this cell: the forward pass takes no step, the adjoint (dense W, quasi) needs several.
    w = (0.8 * torch.randn(4, 4, dtype=F64) / 2).requires_grad_()
    h0 = 0.5 * torch.rand(1, 4, dtype=F64)
    inputs = (torch.atanh(h0) - h0 @ w.detach().T).unsqueeze(1).expand(1, 12, 4)
    assert deer_module._chunking(1, 12, 4, 4, inputs.device) == (2, 6)
    hs, info = deer_rnn(lambda h, x: torch.tanh(h @ w.T + x), inputs, h0, mode="quasi", max_iters=1, return_info=True)
    assert info.iterations == 0
    with pytest.raises(DEERConvergenceError, match="backward") as err:
        hs.sum().backward()
    assert err.value.iterations == 1 and err.value.residual > DEFAULT_TOL[F64]


# ----------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", list(CELLS))
def test_gradients_match_backprop_through_loop(kind, mode):
    for T in (1, 9, 33):
        cell, params, inputs, h0 = make_case(kind, F64, T)
        inputs.requires_grad_(True)
        h0.requires_grad_(True)
        weights = torch.randn(inputs.shape[0], T, h0.shape[1], dtype=F64)
        leaves = [inputs, h0, *params]
        expected = torch.autograd.grad((sequential(cell, inputs, h0) * weights).sum(), leaves)
        got = torch.autograd.grad((deer_rnn(cell, inputs, h0, mode=mode) * weights).sum(), leaves)
        for name, g, e in zip(["inputs", "h0"] + [f"param{i}" for i in range(len(params))], got, expected):
            torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-8, msg=lambda m, n=name, t=T: f"{n} T={t}: {m}")


def test_backward_is_one_implicit_adjoint_solve_and_raises_when_it_cannot_converge():
    """h0 is a fixed point of the cell here: the forward pass needs 0 steps, the adjoint (dense W, quasi) needs more."""
    H, T = 4, 12
    w = (0.8 * torch.randn(H, H, dtype=F64) / H**0.5).requires_grad_()
    h0 = 0.5 * torch.rand(1, H, dtype=F64)
    inputs = (torch.atanh(h0) - h0 @ w.detach().T).unsqueeze(1).expand(1, T, H)

    def cell(h, x):
        return torch.tanh(h @ w.T + x)

    hs, info = deer_rnn(cell, inputs, h0, mode="quasi", max_iters=1, return_info=True)
    assert info.iterations == 0 and type(hs.grad_fn).__name__ == "_ImplicitAdjointBackward"
    with pytest.raises(DEERConvergenceError, match="backward"):
        hs.sum().backward()
    (grad,) = torch.autograd.grad(deer_rnn(cell, inputs, h0, mode="quasi").sum(), [w])
    (expected,) = torch.autograd.grad(sequential(cell, inputs, h0).sum(), [w])
    torch.testing.assert_close(grad, expected, rtol=1e-7, atol=1e-9)


def test_gradients_only_where_needed_and_no_graph_without_grad():
    cell, params, inputs, h0 = make_case("tanh", F64, 6)
    for p in params:
        p.requires_grad_(False)
    assert not deer_rnn(cell, inputs, h0).requires_grad
    h0.requires_grad_(True)
    (g_h0,) = torch.autograd.grad(deer_rnn(cell, inputs, h0).sum(), [h0])
    (e_h0,) = torch.autograd.grad(sequential(cell, inputs, h0).sum(), [h0])
    torch.testing.assert_close(g_h0, e_h0, rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------------------------------- GRU


def _gru_weights(H: int, I: int, dtype=F64):  # noqa: E741
    gru = nn.GRU(I, H, batch_first=True, dtype=dtype)
    gates_x = lambda x: nn.functional.linear(x, gru.weight_ih_l0, gru.bias_ih_l0)  # noqa: E731
    return gru, gates_x, gru.weight_hh_l0, gru.bias_hh_l0


def test_gru_cell_and_diagonal_match_autograd():
    H = 6
    _, _, weight_hh, bias_hh = _gru_weights(H, 3)
    h, gx = torch.randn(4, H, dtype=F64), torch.randn(4, 3 * H, dtype=F64)
    value, diag = gru_cell_and_diagonal(h, gx, weight_hh, bias_hh)
    torch.testing.assert_close(value, gru_cell(h, gx, weight_hh, bias_hh), rtol=0, atol=0)
    for row in range(h.shape[0]):
        J = torch.autograd.functional.jacobian(lambda v, r=row: gru_cell(v, gx[r], weight_hh, bias_hh), h[row])
        torch.testing.assert_close(diag[row], J.diagonal(), rtol=1e-12, atol=1e-12)


def test_gru_cell_vjp_matches_autograd():
    H = 6
    _, _, weight_hh, bias_hh = _gru_weights(H, 3)
    for bias in (bias_hh, None):
        h, gx, v = torch.randn(4, H, dtype=F64), torch.randn(4, 3 * H, dtype=F64), torch.randn(4, H, dtype=F64)
        _, vjp = torch.func.vjp(partial(gru_cell, gates_x=gx, weight_hh=weight_hh, bias_hh=bias), h)
        torch.testing.assert_close(gru_cell_vjp(h, gx, weight_hh, bias)(v), vjp(v)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_steps", [1, 2], ids=["plain", "chunked"])
@pytest.mark.parametrize("mode", MODES)
def test_fused_vjp_gives_the_same_gradients_and_a_wrong_one_is_refused(monkeypatch, mode, chunk_steps):
    monkeypatch.setattr(deer_module, "_CHUNK_STEPS", chunk_steps)
    monkeypatch.setattr(deer_module, "_CPU_BLOCK_ELEMENTS", 4 * 2 * (5 + 15))
    gru, gates_x, weight_hh, bias_hh = _gru_weights(5, 3)
    inputs = torch.randn(2, 23, 3, dtype=F64, requires_grad=True)
    h0 = torch.randn(2, 5, dtype=F64, requires_grad=True)
    cell = partial(gru_cell, weight_hh=weight_hh, bias_hh=bias_hh)
    leaves = [inputs, h0, *gru.parameters()]
    expected = torch.autograd.grad(sequential(cell, gates_x(inputs), h0).square().sum(), leaves)
    fused = partial(gru_cell_vjp, weight_hh=weight_hh, bias_hh=bias_hh)
    got = torch.autograd.grad(deer_rnn(cell, gates_x(inputs), h0, mode=mode, cell_vjp=fused).square().sum(), leaves)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-8)

    def wrong(h, x):
        right = fused(h, x)
        return lambda v: 1.01 * right(v)

    with pytest.raises(ValueError, match="cell_vjp.*disagrees"):
        deer_rnn(cell, gates_x(inputs), h0, mode=mode, cell_vjp=wrong).sum().backward()
    with pytest.raises(TypeError, match="cell_vjp"):
        deer_rnn(cell, gates_x(inputs), h0, mode=mode, cell_vjp=lambda h, x: None).sum().backward()


def test_quasi_with_fused_diagonal_matches_generic_quasi_values_and_gradients():
    T, H = 40, 5
    gru, gates_x, weight_hh, bias_hh = _gru_weights(H, 3)
    inputs = torch.randn(2, T, 3, dtype=F64)
    h0 = torch.randn(2, H, dtype=F64, requires_grad=True)
    cell = partial(gru_cell, weight_hh=weight_hh, bias_hh=bias_hh)
    fused = partial(gru_cell_and_diagonal, weight_hh=weight_hh, bias_hh=bias_hh)
    leaves = [h0, *gru.parameters()]
    plain, plain_info = deer_rnn(cell, gates_x(inputs), h0, mode="quasi", return_info=True)
    quick, quick_info = deer_rnn(cell, gates_x(inputs), h0, mode="quasi", return_info=True, cell_and_diagonal=fused)
    torch.testing.assert_close(quick, plain, rtol=0, atol=1e-9)
    assert quick_info.iterations == plain_info.iterations
    expected = torch.autograd.grad(sequential(cell, gates_x(inputs), h0).square().sum(), leaves)
    for g, e in zip(torch.autograd.grad(quick.square().sum(), leaves), expected):
        torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-8)


def test_fused_value_that_disagrees_with_cell_is_refused():
    cell, _, inputs, h0 = make_case("tanh", F64, 5)

    def wrong(h, x):
        return cell(h, x) + 0.1, torch.zeros_like(h)

    with pytest.raises(ValueError, match="disagrees with cell"):
        deer_rnn(cell, inputs, h0, mode="quasi", cell_and_diagonal=wrong)


@pytest.mark.parametrize("num_layers,bias,batch_first", [(1, True, True), (2, False, True), (2, True, False)])
@pytest.mark.parametrize("mode", MODES)
def test_parallel_gru_equals_torch_gru(num_layers, bias, batch_first, mode):
    B, T, I, H = 3, 23, 4, 6  # noqa: E741
    gru = nn.GRU(I, H, num_layers=num_layers, bias=bias, batch_first=batch_first, dtype=F64)
    ours = ParallelGRU.from_gru(gru, mode=mode)
    assert list(ours.state_dict()) == list(gru.state_dict())
    x = torch.randn(B, T, I, dtype=F64) if batch_first else torch.randn(T, B, I, dtype=F64)
    hx = torch.randn(num_layers, B, H, dtype=F64)
    for args in [(x,), (x, hx)]:
        expected_out, expected_hn = gru(*args)
        out, h_n = ours(*args)
        torch.testing.assert_close(out, expected_out, rtol=0, atol=1e-8)
        torch.testing.assert_close(h_n, expected_hn, rtol=0, atol=1e-8)
    assert_same_gradients(ours, gru, x, hx)


def test_parallel_gru_float32_unbatched_and_state_dict_round_trip():
    gru = nn.GRU(3, 8, batch_first=True)
    ours = ParallelGRU(3, 8)
    ours.load_state_dict(gru.state_dict())
    x = torch.randn(300, 3)  # unbatched [T, I]
    with torch.no_grad():
        expected_out, expected_hn = gru(x)
        out, h_n = ours(x)
    assert out.shape == (300, 8) and h_n.shape == (1, 8)
    assert (out - expected_out).abs().max() <= 1e-4 and (h_n - expected_hn).abs().max() <= 1e-4


def test_parallel_gru_rejects_what_it_does_not_support():
    with pytest.raises(ValueError, match="bidirectional"):
        ParallelGRU(3, 4, bidirectional=True)
    with pytest.raises(ValueError, match="mode"):
        ParallelGRU(3, 4, mode="jacobi")
    gru = ParallelGRU(3, 4, num_layers=2)
    with pytest.raises(ValueError, match="input must be"):
        gru(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="hx must have shape"):
        gru(torch.randn(2, 5, 3), torch.randn(1, 2, 4))
    with pytest.raises(TypeError, match="nn.GRU"):
        ParallelGRU.from_gru(nn.LSTM(3, 4))


# ----------------------------------------------------------------------------------------------- argument errors


def test_deer_rnn_rejects_malformed_arguments():
    cell, _, inputs, h0 = make_case("tanh", F64, 4)
    cases = [
        (ValueError, "inputs must be", lambda: deer_rnn(cell, inputs[0], h0)),
        (ValueError, "empty time", lambda: deer_rnn(cell, inputs[:, :0], h0)),
        (TypeError, "floating point", lambda: deer_rnn(cell, inputs.long(), h0)),
        (ValueError, "h0 must be", lambda: deer_rnn(cell, inputs, h0[:1])),
        (ValueError, "h0 must be", lambda: deer_rnn(cell, inputs, None)),
        (TypeError, "share dtype", lambda: deer_rnn(cell, inputs, h0.float())),
        (ValueError, "mode must be", lambda: deer_rnn(cell, inputs, h0, mode="jacobi")),
        (ValueError, "max_iters", lambda: deer_rnn(cell, inputs, h0, max_iters=0)),
        (ValueError, "tol must be", lambda: deer_rnn(cell, inputs, h0, tol=0.0)),
        (ValueError, "only applies to mode='quasi'", lambda: deer_rnn(cell, inputs, h0, cell_and_diagonal=cell)),
        (ValueError, "must return a tensor like h_prev", lambda: deer_rnn(lambda h, x: h[:, :2], inputs, h0)),
        (ValueError, "must return a pair", lambda: deer_rnn(cell, inputs, h0, mode="quasi", cell_and_diagonal=cell)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
