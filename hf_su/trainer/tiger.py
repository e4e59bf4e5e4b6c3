"""Tiger optimizer (Su Jianlin, 2023) with Su's full semantics, and parameter groups that follow his rules.

Tiger is sign-momentum with a single state buffer (Lion with ``beta1 = beta2``)::

    m     <- beta * m + (1 - beta) * g
    theta <- theta - eta * (sign(m) + weight_decay * theta)

Su's version (``bojone/tiger``) adds four things that the bare PyTorch ports lack, all implemented here:

* **per-kind learning rate**: ``eta = lr * scale`` with ``scale`` = RMS of the whole tensor for matrices
  (``lr_scale="rms"``), the RMS of each row for embeddings (``"row_rms"``) and a constant 0.5 for biases and norm
  gains (no weight decay for them). RMS is measured on the parameter before the update and floored at
  ``min_rms`` (default ``1e-3``) so a zero-initialised matrix (LoRA ``B``, zero-init output projections) still moves,
  by ``lr * min_rms`` per entry and step until its RMS passes the floor. Common initialisations (std 0.02, or
  0.02/sqrt(2 * layers) >= 2e-3 for GPT-2-style residual projections) and pretrained weights sit above the floor, so
  it does not change Su's rule for them; raise ``min_rms`` in a LoRA group to grow ``B`` faster.
* **skip-and-shrink on NaN/Inf**: a tensor whose gradient is not finite keeps its momentum and is shrunk toward its
  centre instead, ``theta <- (theta - center) * shrink_ratio + center`` (centre 1 for norm gains, else 0). Su's
  code tests for NaN only; Inf is treated the same here because it would otherwise poison the momentum forever.
  The test is whether the gradient's L2 norm is finite, so a gradient whose norm overflows float32 (~1.8e19)
  counts as non-finite too. As in Su's code the shrink happens at the micro-step that saw the bad gradient, even
  inside an accumulation cycle, and that micro-step adds nothing to the momentum.
* **buffer-free gradient accumulation**: with ``grad_accum_steps=k`` call :meth:`Tiger.step` after every
  micro-batch. The momentum is multiplied by ``beta`` at the first micro-step of each cycle, every micro-batch adds
  ``(1 - beta) / k * g``, and parameters move only at the cycle's last micro-step, so after ``k`` micro-steps the
  momentum equals ``beta * m + (1 - beta) * mean(g)`` without any gradient-accumulation buffer. A parameter
  without a gradient at some micro-step is skipped for that micro-step (as Su's Keras code skips it). With
  ``step_in_backward=True`` this runs inside ``backward()``: each parameter's gradient is folded into its momentum
  by a post-accumulate-grad hook and freed at once, so a training step holds parameters plus one state buffer and
  never a full set of gradients.
* **lazy embedding rows** (the fix from "Lion/Tiger优化器训练下的Embedding异常和对策"): with ``lazy=True`` a row
  (slice along the last dimension) whose gradient is exactly zero over the whole accumulation cycle is not changed
  at all: no sign step and no weight decay. Without it, the row of a token seen once and then no more keeps
  stepping by ``eta * sign(m)`` while its momentum decays toward zero (the sign does not change until the momentum
  underflows), and drifts to the fixed point ``±1/weight_decay``; rows of tokens never seen are pulled toward 0 by
  the weight decay.
  The momentum of such a row still decays (it is updated as if the row's gradient were zero), as in Su's
  LazyOptimizer: when the token reappears its first update is then driven by the fresh gradient instead of a stale
  direction frozen since the token was last seen, and the decay cannot move the parameter because only the
  parameter update is masked.

``group["lr"]`` is Su's global relative learning rate ``alpha_t``: Transformers' LR schedulers (which write
``group["lr"]``) replace his ``lr_schedule``. Momentum is kept in float32 for bf16/fp16 parameters and the update is
computed in float32 before rounding back. Under FSDP2 (``torch.distributed.fsdp.fully_shard``) the RMS and the
NaN test use the whole tensor (sums of squares and non-finite flags are all-reduced over the shard group), so
sharded training matches a single process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

__all__ = ["Tiger", "tiger_param_groups"]

_LR_SCALE_KINDS = ("rms", "row_rms")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _state_dtype(param: torch.Tensor) -> torch.dtype:
    """Momentum dtype: float32 for half-precision parameters, the parameter's own dtype otherwise."""
    return torch.float32 if param.dtype in _LOW_PRECISION else param.dtype


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "placements")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view that in-place updates write through), or the tensor itself."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _shard_groups(param: torch.Tensor) -> tuple[tuple[Any, ...], bool]:
    """Process groups over which ``param`` is sharded, and whether its last dimension is one of the sharded dims."""
    if not _is_dtensor(param):
        return (), False
    groups, last_dim_sharded = [], False
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_shard():
            groups.append(param.device_mesh.get_group(mesh_dim))
            last_dim_sharded |= placement.dim in (-1, param.ndim - 1)
        elif placement.is_partial():
            raise ValueError("Tiger cannot update a parameter with a Partial placement; redistribute it first")
    return tuple(groups), last_dim_sharded


def _all_reduce_sum(tensors: list[torch.Tensor], groups: tuple[Any, ...]) -> list[torch.Tensor]:
    """Sum each tensor over the given process groups with one collective per group (the tensors travel packed)."""
    if not groups or not tensors:
        return tensors
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    for group in groups:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].view(t.shape).to(t.dtype))
        start += t.numel()
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_hyperparameters(group: dict[str, Any]) -> None:
    """Raise a ValueError/TypeError naming the first invalid Tiger hyperparameter of a parameter group."""
    for key in ("lr", "weight_decay", "min_rms"):
        if not _is_number(group[key]) or group[key] < 0:
            raise ValueError(f"{key} must be a finite number >= 0, got {group[key]!r}")
    if not _is_number(group["beta"]) or not 0.0 <= group["beta"] < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {group['beta']!r}")
    if not _is_number(group["shrink_ratio"]) or not 0.0 < group["shrink_ratio"] <= 1.0:
        raise ValueError(f"shrink_ratio must be in (0, 1], got {group['shrink_ratio']!r}")
    steps = group["grad_accum_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"grad_accum_steps must be a positive integer, got {steps!r}")
    scale = group["lr_scale"]
    if scale is not None and scale not in _LR_SCALE_KINDS and not (_is_number(scale) and scale > 0):
        raise ValueError(f"lr_scale must be None, 'rms', 'row_rms' or a positive number, got {scale!r}")
    if not _is_number(group["center"]):
        raise TypeError(f"center must be a finite number, got {group['center']!r}")
    for key in ("lazy", "foreach"):
        if not isinstance(group[key], bool):
            raise TypeError(f"{key} must be a bool, got {group[key]!r}")


class Tiger(Optimizer):
    """Tiger: sign-momentum with one state buffer, per-kind learning rates, NaN skip-and-shrink, buffer-free
    gradient accumulation and lazy embedding rows (see the module docstring for the exact rule).

    Args:
        params: Parameters or parameter groups, e.g. ``tiger_param_groups(model)`` (recommended: it applies Su's
            per-kind rules and the lazy embedding fix). Group keys beyond ``lr``, ``beta``, ``weight_decay``:
            ``lr_scale`` (``"rms"``, ``"row_rms"``, a positive float, or ``None`` = by shape: ``"rms"`` for tensors
            with two or more dims, ``0.5`` and no weight decay for scalars and vectors), ``lazy`` (skip rows whose
            gradient is zero), ``center`` (NaN shrink centre), ``min_rms`` (RMS floor) and ``shrink_ratio``.
        lr: Global relative learning rate ``alpha`` (Su: 1e-3 to 2e-3 at peak). LR schedulers scale it.
        beta: Momentum coefficient (Su: 0.965 for language models, 0.945 for vision).
        weight_decay: Decoupled weight decay ``lambda``; the step is ``eta * (sign(m) + lambda * theta)``.
        shrink_ratio: Factor toward the centre applied to a tensor whose gradient is NaN/Inf.
        grad_accum_steps: Micro-batches per update; call :meth:`step` after each one.
        min_rms: Floor of the RMS used by ``"rms"``/``"row_rms"`` scaling, so zero-initialised tensors learn.
        step_in_backward: Run the update inside ``backward()`` from per-parameter post-accumulate-grad hooks and
            free each gradient immediately; :meth:`step` then only advances the micro-step counter. Gradients are
            never visible, so gradient clipping is not possible in this mode; every ``backward()`` is one
            micro-step (use ``grad_accum_steps`` instead of the Trainer's ``gradient_accumulation_steps``). For a
            single process: under DDP the hooks would see gradients before their all-reduce, and FSDP2 parameters
            are refused.
        foreach: Use the multi-tensor ``torch._foreach_*`` implementation (``None`` = yes). ``False`` runs one
            tensor at a time; both give the same numbers.

    Example::

        opt = Tiger(tiger_param_groups(model, weight_decay=0.01), lr=1e-3)
        for batch in loader:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        beta: float = 0.965,
        weight_decay: float = 0.01,
        *,
        shrink_ratio: float = 0.99,
        grad_accum_steps: int = 1,
        min_rms: float = 1e-3,
        step_in_backward: bool = False,
        foreach: bool | None = None,
    ) -> None:
        self.step_in_backward = bool(step_in_backward)
        self._hook_handles: list[Any] = []
        defaults = dict(
            lr=lr,
            beta=beta,
            weight_decay=weight_decay,
            shrink_ratio=shrink_ratio,
            grad_accum_steps=grad_accum_steps,
            min_rms=min_rms,
            lr_scale=None,
            lazy=False,
            center=0.0,
            foreach=True if foreach is None else foreach,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a copy or unpickled optimizer has no hooks: it steps in the ordinary way
        super().__setstate__(state)
        self.__dict__.setdefault("step_in_backward", False)
        self.__dict__.setdefault("_hook_handles", [])

    # ------------------------------------------------------------------ groups, state, (de)serialisation

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (validated); it joins the optimizer's current micro-step of the accumulation cycle."""
        _check_hyperparameters({**self.defaults, **param_group})
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if p.is_complex() or not p.is_floating_point():
                self.param_groups.pop()
                raise TypeError(f"Tiger needs real floating-point parameters, got {p.dtype}")
        first = self.param_groups[0]
        group.setdefault("micro_step", first.get("micro_step", 0) if first is not group else 0)
        if self.step_in_backward:
            self._register_hooks(group)

    def _momentum(self, param: torch.Tensor) -> torch.Tensor:
        state = self.state[param]
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(param, dtype=_state_dtype(param), memory_format=torch.preserve_format)
        return state["momentum"]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`, keeping the momentum in float32 for half-precision parameters.

        ``torch.optim.Optimizer.load_state_dict`` casts every state tensor to its parameter's dtype, which would
        round a bf16 model's float32 momentum to bf16 and turn the boolean lazy-row flags into floats; both are
        restored from the saved tensors afterwards.
        """
        saved_state = dict(state_dict["state"])
        super().load_state_dict(state_dict)
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for index, param in zip(saved_group["params"], group["params"]):
                state = saved_state.get(index, {})
                if "momentum" in state and param.dtype in _LOW_PRECISION:
                    value = state["momentum"].to(device=param.device, dtype=torch.float32, copy=True)
                    self.state[param]["momentum"] = value
                if "touched" in state:  # the base class casts it to the parameter's dtype too
                    self.state[param]["touched"] = state["touched"].to(device=param.device, dtype=torch.bool)

    # ------------------------------------------------------------------ stepping

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Process one micro-batch: fold the gradients into the momentum and, at the last micro-step of an
        accumulation cycle, update the parameters. In ``step_in_backward`` mode the work already happened during
        ``backward()`` and this only advances the micro-step counter.

        Args:
            closure: Optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not self.step_in_backward:
                params = [p for p in group["params"] if p.grad is not None]
                if params:
                    self._update(group, params, [p.grad for p in params], foreach=group["foreach"])
            group["micro_step"] += 1
        return loss

    def _register_hooks(self, group: dict[str, Any]) -> None:
        index = len(self.param_groups) - 1  # looked up at call time: load_state_dict replaces the group dicts
        for param in group["params"]:
            if not param.requires_grad:
                continue
            if _is_dtensor(param):
                raise TypeError(
                    "step_in_backward does not support DTensor (FSDP2) parameters: FSDP2 assigns sharded gradients "
                    "after its reduce-scatter, outside autograd's accumulation hooks; use the ordinary step()"
                )
            self._hook_handles.append(param.register_post_accumulate_grad_hook(self._make_hook(index)))

    def _make_hook(self, group_index: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            with torch.no_grad():
                self._update(self.param_groups[group_index], [param], [param.grad], foreach=False)
            param.grad = None  # the gradient lives on only in the momentum

        return hook

    def remove_hooks(self) -> None:
        """Remove the step-in-backward hooks (the optimizer then behaves as with ``step_in_backward=False``)."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        self.step_in_backward = False

    def _update(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor], *, foreach: bool
    ) -> None:
        """Apply one micro-step of Tiger to ``params`` (all from ``group``) with gradients ``grads``."""
        k = group["grad_accum_steps"]
        t = group["micro_step"]
        start, end = t % k == 0, (t + 1) % k == 0
        b1, b2 = (group["beta"] if start else 1.0), (1.0 - group["beta"]) / k
        for g in grads:
            if g.is_sparse:
                raise TypeError(
                    "Tiger does not support sparse gradients; use nn.Embedding(sparse=False) "
                    "(lazy=True gives the sparse-update behaviour)"
                )
        plans = [_TensorPlan(p, g, self._momentum(p), group) for p, g in zip(params, grads)]
        _gather_statistics(plans, end=end, foreach=foreach)
        for plan in plans:
            if plan.lazy:
                plan.row_mask = self._lazy_rows(plan, start, end, accumulating=k > 1)

        fast = [pl for pl in plans if foreach and not (pl.bad or pl.lazy or pl.scale == "row_rms")]
        for batch in _by_device_and_dtype(fast):
            _foreach_tiger(batch, b1=b1, b2=b2, end=end)
        fast_ids = {id(pl) for pl in fast}
        for plan in plans:
            if id(plan) not in fast_ids:
                _single_tiger(plan, b1=b1, b2=b2, end=end)

    def _lazy_rows(self, plan: _TensorPlan, start: bool, end: bool, *, accumulating: bool) -> torch.Tensor | None:
        """Rows whose parameters may change this micro-step: on a bad gradient the rows that carried it (for the
        shrink); at a cycle's end the rows with a non-zero gradient in any of its micro-steps; otherwise none."""
        touched = plan.touched_now
        if accumulating:
            state = self.state[plan.param_ref]
            if start or "touched" not in state:
                state["touched"] = torch.zeros_like(touched)
            state["touched"] |= touched
            touched = state["touched"]
        if plan.bad:
            return plan.touched_now
        return touched if end else None


class _TensorPlan:
    """One parameter's local tensors, its group's rule resolved for its shape, and this micro-step's statistics."""

    __slots__ = (
        "param_ref",
        "param",
        "grad",
        "momentum",
        "scale",
        "weight_decay",
        "center",
        "shrink_ratio",
        "lazy",
        "lr",
        "min_rms",
        "shard_groups",
        "last_dim_sharded",
        "bad",
        "eta",
        "row_eta",
        "row_mask",
        "touched_now",
    )

    def __init__(self, param: torch.Tensor, grad: torch.Tensor, momentum: torch.Tensor, group: dict[str, Any]):
        self.param_ref = param
        self.param, self.grad, self.momentum = _local(param), _local(grad), _local(momentum)
        scale, weight_decay = group["lr_scale"], group["weight_decay"]
        if scale is None:  # Su's rule by shape: matrices scale by RMS, scalars and vectors by 0.5 without decay
            scale, weight_decay = ("rms", weight_decay) if param.ndim >= 2 else (0.5, 0.0)
        self.scale, self.weight_decay = scale, float(weight_decay)
        self.center, self.shrink_ratio = float(group["center"]), float(group["shrink_ratio"])
        self.lazy, self.lr, self.min_rms = group["lazy"], float(group["lr"]), float(group["min_rms"])
        self.shard_groups, self.last_dim_sharded = _shard_groups(param)
        self.bad = False
        self.eta: float | None = None
        self.row_eta: torch.Tensor | None = None
        self.row_mask: torch.Tensor | None = None
        self.touched_now: torch.Tensor | None = None


def _gather_statistics(plans: list[_TensorPlan], *, end: bool, foreach: bool) -> None:
    """Fill each plan's non-finite flag, learning rate(s) and touched rows.

    Whole-tensor quantities cross to the host in one transfer; under FSDP2 the local partial sums travel in one
    all-reduce per shard group, so every rank sees the statistics of the whole (unsharded) tensor.
    """
    # The L2 norm is NaN/Inf exactly when the gradient holds a NaN/Inf (or when it overflows float32, ~1.8e19,
    # which is treated as non-finite too); it is several times faster on CPU than an inf-norm or isfinite().all().
    grad_norms = _norms([pl.grad for pl in plans], foreach=foreach)
    bad = (~torch.isfinite(torch.stack(grad_norms).to(torch.float64))).to(torch.float64)
    rms_plans = [i for i, pl in enumerate(plans) if end and pl.scale == "rms"]
    norms = _norms([plans[i].param for i in rms_plans], foreach=foreach)
    squares = torch.stack(norms).to(torch.float64).square() if norms else bad.new_zeros(0)
    row_squares = {
        i: torch.linalg.vector_norm(pl.param, dim=-1, dtype=_state_dtype(pl.param)).to(torch.float64).square()
        for i, pl in enumerate(plans)
        if end and pl.scale == "row_rms"
    }
    for pl in plans:
        if pl.lazy:
            pl.touched_now = (pl.grad != 0).any(-1)

    members_by_groups: dict[tuple[Any, ...], list[int]] = {}
    for i, pl in enumerate(plans):
        if pl.shard_groups:
            members_by_groups.setdefault(pl.shard_groups, []).append(i)
    rms_position = {i: j for j, i in enumerate(rms_plans)}
    for groups, members in members_by_groups.items():
        rms_members = [rms_position[i] for i in members if i in rms_position]
        # rows are whole on each rank unless the last dim is sharded: only then do row statistics travel
        row_members = [i for i in members if plans[i].last_dim_sharded]
        row_sq_members = [i for i in row_members if i in row_squares]
        lazy_members = [i for i in row_members if plans[i].lazy]
        reduced = _all_reduce_sum(
            [bad[members], squares[rms_members]]
            + [row_squares[i] for i in row_sq_members]
            + [plans[i].touched_now.to(torch.float64) for i in lazy_members],
            groups,
        )
        bad[members], squares[rms_members] = reduced[0], reduced[1]
        for i, value in zip(row_sq_members, reduced[2 : 2 + len(row_sq_members)]):
            row_squares[i] = value
        for i, value in zip(lazy_members, reduced[2 + len(row_sq_members) :]):
            plans[i].touched_now = value > 0

    host = torch.cat([bad, squares]).tolist()
    for pl, flag in zip(plans, host):
        pl.bad = flag > 0
        if end and not isinstance(pl.scale, str):
            pl.eta = pl.lr * float(pl.scale)
    for i, sq in zip(rms_plans, host[len(plans) :]):
        pl = plans[i]
        pl.eta = pl.lr * max(math.sqrt(sq / pl.param_ref.numel()), pl.min_rms)
    for i, sq in row_squares.items():
        pl = plans[i]
        rms = (sq / pl.param_ref.shape[-1]).sqrt().clamp_min(pl.min_rms)
        pl.row_eta = (pl.lr * rms).to(pl.momentum.dtype).unsqueeze(-1)


def _norms(tensors: list[torch.Tensor], *, foreach: bool) -> list[torch.Tensor]:
    """L2 norms accumulated at least in float32 (a bf16 norm would round the RMS that scales the step)."""
    if not foreach:
        return [torch.linalg.vector_norm(t, dtype=_state_dtype(t)) for t in tensors]
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(_state_dtype(t), []).append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
    for dtype, members in by_dtype.items():
        for i, norm in zip(members, torch._foreach_norm([tensors[i] for i in members], 2, dtype=dtype)):
            out[i] = norm
    return out


def _by_device_and_dtype(plans: list[_TensorPlan]) -> list[list[_TensorPlan]]:
    batches: dict[tuple[Any, ...], list[_TensorPlan]] = {}
    for pl in plans:
        batches.setdefault((pl.param.device, pl.param.dtype, pl.grad.dtype), []).append(pl)
    return list(batches.values())


def _foreach_tiger(plans: list[_TensorPlan], *, b1: float, b2: float, end: bool) -> None:
    """Multi-tensor Tiger micro-step for finite gradients and whole-tensor learning rates."""
    moms = [pl.momentum for pl in plans]
    grads = [pl.grad for pl in plans]
    if grads[0].dtype != moms[0].dtype:
        grads = [g.to(moms[0].dtype) for g in grads]
    if b1 + b2 == 1.0:
        torch._foreach_lerp_(moms, grads, b2)
    else:
        if b1 != 1.0:
            torch._foreach_mul_(moms, b1)
        torch._foreach_add_(moms, grads, alpha=b2)
    if not end:
        return
    params = [pl.param for pl in plans]
    work = params if params[0].dtype == moms[0].dtype else [p.to(moms[0].dtype) for p in params]
    decays = [1.0 - pl.eta * pl.weight_decay for pl in plans]
    if any(d != 1.0 for d in decays):
        torch._foreach_mul_(work, decays)
    _sign_step(work, moms, [pl.eta for pl in plans], reuse_scratch=work[0].device.type == "cpu")
    if work is not params:
        torch._foreach_copy_(params, work)


def _sign_step(params: list[torch.Tensor], moms: list[torch.Tensor], etas: list[float], *, reuse_scratch: bool) -> None:
    """``params[i] -= etas[i] * sign(moms[i])`` for all i.

    ``_foreach_sign`` materialises a sign tensor for every parameter at once; on CPU faulting in those fresh pages
    costs more than the arithmetic, so there (``reuse_scratch``) one scratch buffer is reused tensor by tensor.
    """
    if reuse_scratch:
        scratch = torch.empty(max(m.numel() for m in moms), dtype=moms[0].dtype, device=moms[0].device)
        for p, m, eta in zip(params, moms, etas):
            p.add_(torch.sign(m, out=scratch[: m.numel()].view(m.shape)), alpha=-eta)
    else:
        steps = torch._foreach_sign(moms)
        torch._foreach_mul_(steps, [-eta for eta in etas])
        torch._foreach_add_(params, steps)


def _single_tiger(plan: _TensorPlan, *, b1: float, b2: float, end: bool) -> None:
    """One tensor's Tiger micro-step: skip-and-shrink on a bad gradient, lazy rows, per-row learning rates."""
    param, m = plan.param, plan.momentum
    work = param if param.dtype == m.dtype else param.to(m.dtype)
    if plan.bad:  # momentum unchanged; shrink toward the centre (only the rows that carried the gradient if lazy)
        shrunk = (work - plan.center).mul_(plan.shrink_ratio).add_(plan.center)
        if plan.row_mask is not None:
            shrunk = torch.where(plan.row_mask.unsqueeze(-1), shrunk, work)
        param.copy_(shrunk)
        return
    grad = plan.grad.to(m.dtype)
    if b1 + b2 == 1.0:
        m.lerp_(grad, b2)
    else:
        if b1 != 1.0:
            m.mul_(b1)
        m.add_(grad, alpha=b2)
    if not end:
        return
    eta: float | torch.Tensor = plan.row_eta if plan.row_eta is not None else plan.eta
    if plan.row_mask is not None:  # untouched rows get a zero learning rate, which leaves them exactly unchanged
        eta = plan.row_mask.unsqueeze(-1).to(m.dtype) * eta
    if plan.weight_decay:
        work.mul_(1.0 - eta * plan.weight_decay)
    if isinstance(eta, torch.Tensor):
        work.addcmul_(m.sign(), eta, value=-1.0)
    else:
        work.add_(m.sign(), alpha=-eta)
    if work is not param:
        param.copy_(work)


# ---------------------------------------------------------------------------------------------- parameter groups


def _is_norm_module(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _gain_center(param: torch.Tensor) -> float:
    """Shrink centre of a norm gain: its neutral value, 1 for ``x * w`` gains and 0 for Gemma-style ``x * (1 + w)``
    ones. Read as whichever of 0 and 1 is nearer the gain's mean when the groups are built."""
    if param.is_meta:
        return 1.0
    value = param.detach()
    if _is_dtensor(value):
        value = value.full_tensor()
    return 1.0 if float(value.float().mean()) > 0.5 else 0.0


def tiger_param_groups(
    model: nn.Module, weight_decay: float = 0.01, lazy_embeddings: bool = True
) -> list[dict[str, Any]]:
    """Parameter groups that apply Su's per-kind Tiger rules, classified by module type and shape.

    * ``nn.Embedding``/``nn.EmbeddingBag`` weights (a tied output matrix included): per-row RMS learning rate, weight decay, and lazy
      rows (``lazy_embeddings``) so that rows of tokens absent from a batch do not drift to ``±1/weight_decay``.
    * Scalars and vectors (biases, norm gains, other element-wise parameters): learning rate ``0.5 * lr``, no weight
      decay; norm gains (``weight`` of a module whose class name contains "Norm") shrink toward their neutral value
      (1, or 0 for ``1 + w`` gains) on a NaN gradient, everything else toward 0.
    * Every other tensor (linear and convolution weights, LoRA matrices): whole-tensor RMS learning rate and weight
      decay.

    Frozen parameters (``requires_grad=False``) are left out, so PEFT models give only their adapters.

    Args:
        model: Any ``nn.Module`` (a Transformers model, a PEFT-wrapped model, an FSDP2-sharded model).
        weight_decay: ``lambda`` for matrices and embeddings.
        lazy_embeddings: Apply the lazy-row fix to embedding weights.

    Returns:
        Non-empty groups (dicts with ``params``, ``lr_scale``, ``weight_decay``, ``lazy``, ``center``) for
        :class:`Tiger`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"tiger_param_groups needs an nn.Module, got {type(model).__name__}")
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    embeddings: dict[int, nn.Parameter] = {}
    gains: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.weight.requires_grad:
            embeddings[id(module.weight)] = module.weight
        elif _is_norm_module(module):
            for name, param in module.named_parameters(recurse=False):
                if name != "bias" and param.ndim <= 1:
                    gains[id(param)] = param

    groups: dict[str, dict[str, Any]] = {
        "embedding": dict(params=[], lr_scale="row_rms", weight_decay=weight_decay, lazy=lazy_embeddings, center=0.0),
        "matrix": dict(params=[], lr_scale="rms", weight_decay=weight_decay, lazy=False, center=0.0),
        "gain_1": dict(params=[], lr_scale=0.5, weight_decay=0.0, lazy=False, center=1.0),
        "gain_0": dict(params=[], lr_scale=0.5, weight_decay=0.0, lazy=False, center=0.0),
    }
    seen: set[int] = set()
    for param in model.parameters():  # deduplicates tied parameters
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if id(param) in embeddings:
            kind = "embedding"
        elif param.ndim >= 2:
            kind = "matrix"
        elif id(param) in gains:
            kind = "gain_1" if _gain_center(param) == 1.0 else "gain_0"
        else:
            kind = "gain_0"
        groups[kind]["params"].append(param)
    return [group for group in groups.values() if group["params"]]
