"""EMO: Earth Mover Distance Optimization loss (Ren et al. 2023), reference and fused (chunked) forms.

For a token with target ``y``, logits ``z``, ``q = softmax(z)`` and ``ê`` the row-normalised cost embedding (no
gradient), the transport cost between ``q`` and the one-hot target under the cost ``1 - cos(e_i, e_y)`` is
``1 - <ê_y, Σ_j q_j ê_j>``. The official code removes the target's own probability from the *value* only
(``q̃ = q - stopgrad(q ⊙ onehot(y))``), so

    emo_t = 1 - Σ_{j≠y} q_j cos(e_j, e_y)        with gradient   ∂emo_t/∂z = -q ⊙ (s - <q, s>),  s_j = cos(e_j, e_y)
    mle_t = logsumexp(z) - z_y                   with gradient   ∂mle_t/∂z = q - onehot(y)

and the modes combine them with detached per-token ratios:

    "mix":  0.5 * (mle_t + stopgrad(mle_t / emo_t) * emo_t)     (official mode 1; ``ratio_clip`` caps the ratio)
    "emo2": stopgrad(emo_t / mle_t) * mle_t + emo_t             (official mode 2)
    "emo":  emo_t
    "ce":   mle_t

:func:`emo_loss` is the readable reference on materialised logits. :func:`fused_emo_loss` takes the hidden states
and the output embedding instead and never holds the tokens×vocab logits: it runs over token chunks and computes the
gradients w.r.t. hidden states, weight and bias inside the forward (as Liger-Kernel's fused linear cross-entropy
does), so the peak extra memory is two chunk×vocab buffers plus the weight gradient.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

MODES = ("mix", "emo2", "emo", "ce")
REDUCTIONS = ("mean", "sum", "none")

# The official code guards its ratios and its normalisation with these constants; keep them so values match.
_RATIO_EPS = 1e-10
_NORM_EPS = 1e-12


class EMOLossParts(NamedTuple):
    """Detached per-batch sums of the two ingredients, for logging.

    Attributes:
        ce_sum: sum over non-ignored tokens of the cross-entropy ``mle_t``.
        emo_sum: sum over non-ignored tokens of ``emo_t``.
        num_tokens: number of non-ignored tokens.
    """

    ce_sum: torch.Tensor
    emo_sum: torch.Tensor
    num_tokens: torch.Tensor


# ---------------------------------------------------------------------------------------------------------------------
# shared pieces


def _check_options(mode: str, reduction: str, num_items_in_batch, ratio_clip: float | None) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown EMO mode {mode!r}; choose from {MODES}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose from {REDUCTIONS}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(
            f"num_items_in_batch replaces the token count of reduction='mean'; it cannot be used with "
            f"reduction={reduction!r}"
        )
    if ratio_clip is not None:
        if mode not in ("mix", "emo2"):
            raise ValueError(f"ratio_clip only applies to the 'mix' and 'emo2' modes, not {mode!r}")
        if not ratio_clip > 0:
            raise ValueError(f"ratio_clip must be positive, got {ratio_clip}")


def _check_labels(labels: torch.Tensor, leading_shape: torch.Size, vocab_size: int, ignore_index: int) -> None:
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != leading_shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match the tokens' shape {tuple(leading_shape)}")
    valid = labels != ignore_index
    if valid.any():
        lo, hi = labels[valid].min().item(), labels[valid].max().item()
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; got {lo}..{hi}"
            )


def _check_cost_embedding(cost_embedding: torch.Tensor, vocab_size: int, what: str) -> None:
    if cost_embedding.dim() != 2:
        raise ValueError(f"cost_embedding must be 2-D [vocab, dim], got shape {tuple(cost_embedding.shape)}")
    if cost_embedding.shape[0] != vocab_size:
        raise ValueError(
            f"vocab size mismatch: {what} has {vocab_size} entries but cost_embedding has {cost_embedding.shape[0]} rows"
        )
    if not cost_embedding.is_floating_point():
        raise TypeError(f"cost_embedding must be a floating tensor, got {cost_embedding.dtype}")


def _mode_coefficients(
    mle: torch.Tensor, emo: torch.Tensor, mode: str, ratio_clip: float | None
) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """Detached per-token weights ``(a, b)`` with ``loss_t = a * mle_t + b * emo_t`` (value and gradient)."""
    if mode == "ce":
        return 1.0, 0.0
    if mode == "emo":
        return 0.0, 1.0
    if mode == "mix":
        ratio = mle.detach() / (emo.detach() + _RATIO_EPS)
        if ratio_clip is not None:
            ratio = ratio.clamp(max=ratio_clip)
        return 0.5, 0.5 * ratio
    ratio = emo.detach() / (mle.detach() + _RATIO_EPS)  # "emo2"
    if ratio_clip is not None:
        ratio = ratio.clamp(max=ratio_clip)
    return ratio, 1.0


def _denominator(reduction: str, num_valid: torch.Tensor, num_items_in_batch) -> torch.Tensor | None:
    """What the token sum is divided by (``None``: no division). Never zero, so all-ignored batches give 0, not NaN."""
    if reduction != "mean":
        return None
    if num_items_in_batch is None:
        return num_valid.clamp(min=1).float()
    if torch.is_tensor(num_items_in_batch):
        return num_items_in_batch.to(device=num_valid.device, dtype=torch.float32).clamp(min=1)
    return torch.tensor(max(float(num_items_in_batch), 1.0), device=num_valid.device)


# ---------------------------------------------------------------------------------------------------------------------
# reference on materialised logits


def emo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    cost_embedding: torch.Tensor,
    *,
    mode: str = "mix",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    ratio_clip: float | None = None,
    return_parts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, EMOLossParts]:
    """EMO loss on materialised logits (labels aligned with logits: shift them first for causal LMs).

    Args:
        logits: ``[..., V]`` scores; computed on in float32 (or float64 if given).
        labels: ``[...]`` integer targets; ``ignore_index`` marks positions that do not count.
        cost_embedding: ``[V, D]`` embedding whose row cosines define the transport cost; used detached.
        mode: ``"mix"`` (default, official mode 1), ``"emo2"`` (official mode 2), ``"emo"`` or ``"ce"``.
        ignore_index: label value to ignore.
        reduction: ``"mean"`` over non-ignored tokens, ``"sum"``, or ``"none"`` (per-token, 0 where ignored).
        num_items_in_batch: with ``reduction="mean"``, divide the sum by this count instead (the Trainer's
            gradient-accumulation convention: the count over all micro-batches and ranks).
        ratio_clip: upper bound of the detached ratio in ``"mix"``/``"emo2"`` (the official continual fine-tuning
            script uses 3.0 in mode 1).
        return_parts: also return detached CE/EMO sums for logging.

    Returns:
        The loss (scalar, or ``labels.shape`` for ``reduction="none"``), and :class:`EMOLossParts` if asked.

    Raises:
        ValueError: unknown mode/reduction, shape or vocab mismatch, labels out of range.
        TypeError: non-integer labels or a non-floating cost embedding.
    """
    _check_options(mode, reduction, num_items_in_batch, ratio_clip)
    vocab_size = logits.shape[-1]
    _check_labels(labels, logits.shape[:-1], vocab_size, ignore_index)
    _check_cost_embedding(cost_embedding, vocab_size, "logits' last dimension")

    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.reshape(-1, vocab_size).to(compute_dtype)
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    target = torch.where(valid, flat_labels, 0)

    log_q = torch.log_softmax(z, dim=-1)
    q = log_q.exp()
    mle = -log_q.gather(1, target[:, None]).squeeze(1)

    e_hat = F.normalize(cost_embedding.detach().to(compute_dtype), dim=-1, eps=_NORM_EPS)
    e_target = e_hat[target]  # [N, D]
    q_target = q.gather(1, target[:, None]).squeeze(1)
    # Σ_j q̃_j s_j with q̃ = q - stopgrad(q ⊙ onehot): the target's term leaves the value but stays in the gradient.
    transported = ((q @ e_hat) * e_target).sum(-1) - q_target.detach() * (e_target * e_target).sum(-1)
    emo = 1.0 - transported

    a, b = _mode_coefficients(mle, emo, mode, ratio_clip)
    per_token = torch.where(valid, a * mle + b * emo, 0.0)

    denominator = _denominator(reduction, valid.sum(), num_items_in_batch)
    if reduction == "none":
        loss = per_token.reshape(labels.shape)
    elif denominator is None:
        loss = per_token.sum()
    else:
        loss = per_token.sum() / denominator
    if not return_parts:
        return loss
    zero = torch.zeros((), dtype=compute_dtype, device=z.device)
    parts = EMOLossParts(
        torch.where(valid, mle, zero).sum().detach(), torch.where(valid, emo, zero).sum().detach(), valid.sum()
    )
    return loss, parts


# ---------------------------------------------------------------------------------------------------------------------
# fused, chunked form


def default_chunk_size(num_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Tokens per chunk: a power of two whose chunk×vocab buffer holds about 2^25 numbers (128 MiB in float32), or
    as many as the tokens×hidden input if that is more (Liger-Kernel's rule); never more than the tokens.

    Large chunks keep the matmuls efficient (on CPU, 256-row chunks cost ~25% more time than 2048-row ones); the
    cap keeps the two chunk buffers small next to the weight gradient for any vocabulary size."""
    liger_rows = math.ceil(num_tokens / max(1, math.ceil(vocab_size / hidden_size)))
    budget_rows = max(1, (1 << 25) // vocab_size)
    rows = max(1 << (budget_rows.bit_length() - 1), 1 << max(0, liger_rows - 1).bit_length())
    return max(1, min(num_tokens, rows))


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """``out = a @ b (+ bias)`` written into a reused buffer: on CPU a fresh chunk-sized tensor costs as much as an
    elementwise pass in page faults. Low-precision products are formed in their dtype, then widened."""
    if a.dtype == out.dtype and (bias is None or bias.dtype == out.dtype):
        torch.mm(a, b, out=out) if bias is None else torch.addmm(bias, a, b, out=out)
    else:
        out.copy_(a @ b if bias is None else torch.addmm(bias, a, b))


class _Chunk(NamedTuple):
    exp: torch.Tensor  # [C, V] exp(z - max z); the softmax is exp * inv_sum (never formed: one pass saved)
    exp_cos: torch.Tensor  # [C, V] exp ⊙ s with s_j = cos(e_j, e_y)
    inv_sum: torch.Tensor  # [C] 1 / Σ_j exp_j
    q_dot_cos: torch.Tensor  # [C] <q, s>
    mle: torch.Tensor  # [C]
    emo: torch.Tensor  # [C]
    a: torch.Tensor | float  # loss_t = a * mle_t + b * emo_t
    b: torch.Tensor | float


def _chunk_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    e_hat: torch.Tensor,
    buffers: tuple[torch.Tensor, torch.Tensor],
    mode: str,
    ratio_clip: float | None,
) -> _Chunk:
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    z, cos = (buf[: hidden.shape[0]] for buf in buffers)
    _matmul_into(z, hidden, weight.T, bias)
    z_target = z[rows, target]
    z_max = z.amax(dim=1, keepdim=True)
    exp = z.sub_(z_max).exp_()
    sum_exp = exp.sum(dim=1)
    inv_sum = 1.0 / sum_exp
    mle = z_max.squeeze(1) + sum_exp.log() - z_target

    _matmul_into(cos, e_hat[target], e_hat.T)
    cos_target = cos[rows, target]
    exp_cos = cos.mul_(exp)
    q_dot_cos = exp_cos.sum(dim=1) * inv_sum
    emo = 1.0 - (q_dot_cos - exp[rows, target] * inv_sum * cos_target)
    a, b = _mode_coefficients(mle, emo, mode, ratio_clip)
    return _Chunk(exp, exp_cos, inv_sum, q_dot_cos, mle, emo, a, b)


def _logit_grad_(chunk: _Chunk, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """d(Σ_t scale_t · loss_t)/dz for the chunk, written over ``chunk.exp``:
    ``q ⊙ (a - b (s - <q, s>)) - a · onehot(y)`` = ``c · exp - d · (exp ⊙ s) - a · onehot(y)`` with per-row
    ``c = (a + b <q, s>) / Σexp`` and ``d = b / Σexp``, each row times ``scale_t``."""
    a = chunk.a * scale
    b = chunk.b * scale
    c = (a + b * chunk.q_dot_cos) * chunk.inv_sum
    d = b * chunk.inv_sum
    grad = chunk.exp.mul_(c[:, None]).addcmul_(chunk.exp_cos, -d[:, None])
    rows = torch.arange(grad.shape[0], device=grad.device)
    grad[rows, target] -= a
    return grad


def _chunk_buffers(hidden: torch.Tensor, vocab_size: int, chunk_size: int, acc: torch.dtype):
    rows = min(chunk_size, hidden.shape[0])
    return tuple(torch.empty(rows, vocab_size, dtype=acc, device=hidden.device) for _ in range(2))


class _FusedEMOFunction(torch.autograd.Function):
    """Scalar reductions: gradients are computed in the forward, the backward only scales them.
    ``reduction="none"``: the forward computes values only and the backward recomputes each chunk, because the
    per-token upstream gradients must multiply the logit gradients before they are projected (Liger #968)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, e_hat, denominator, kept, opts):
        mode, ratio_clip, ignore_index, chunk_size, per_token, grad_flags, acc = opts
        full_rows = hidden.shape[0]
        if kept is not None:  # only these rows count: the others are ignored positions
            hidden, labels = hidden.index_select(0, kept), labels.index_select(0, kept)
        n = hidden.shape[0]
        valid = labels != ignore_index
        target = torch.where(valid, labels, 0)
        losses = torch.zeros(n, dtype=acc, device=hidden.device)
        mle_sum = torch.zeros((), dtype=acc, device=hidden.device)
        emo_sum = torch.zeros((), dtype=acc, device=hidden.device)

        in_forward = not per_token and any(grad_flags)
        if in_forward:
            scale = valid.to(acc) if denominator is None else valid.to(acc) / denominator
            grads = _Grads(hidden, weight, bias, grad_flags, acc, kept, full_rows)
        buffers = _chunk_buffers(hidden, weight.shape[0], chunk_size, acc)
        for start in range(0, n, chunk_size):
            sl = slice(start, min(start + chunk_size, n))
            chunk = _chunk_stats(hidden[sl], weight, bias, target[sl], e_hat, buffers, mode, ratio_clip)
            v = valid[sl]
            losses[sl] = torch.where(v, chunk.a * chunk.mle + chunk.b * chunk.emo, 0.0)
            mle_sum += torch.where(v, chunk.mle, 0.0).sum()
            emo_sum += torch.where(v, chunk.emo, 0.0).sum()
            if in_forward:
                grads.add(sl, hidden[sl], _logit_grad_(chunk, target[sl], scale[sl]))
            del chunk

        ctx.per_token = per_token
        ctx.accumulate_dtype = acc
        ctx.mark_non_differentiable(mle_sum, emo_sum)
        if per_token:
            ctx.opts = opts
            ctx.full_rows = full_rows
            ctx.save_for_backward(hidden, weight, bias, labels, e_hat, kept)
            if kept is not None:
                losses = losses.new_zeros(full_rows).index_copy_(0, kept, losses)
            return losses, mle_sum, emo_sum
        total = losses.sum() if denominator is None else losses.sum() / denominator
        if in_forward:
            ctx.save_for_backward(*grads.result())
        return total, mle_sum, emo_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_mle, _grad_emo):
        if ctx.per_token:
            grad_hidden, grad_weight, grad_bias = _FusedEMOFunction._recompute_grads(ctx, grad_loss)
        else:
            saved = ctx.saved_tensors
            if not saved:
                return (None,) * 8
            grad_hidden, grad_weight, grad_bias = saved
            # The common case is a loss that is not scaled further: skip three full-size multiplications.
            if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
                g = grad_loss.to(ctx.accumulate_dtype)
                grad_hidden, grad_weight, grad_bias = (
                    None if t is None else (t * g).to(t.dtype) for t in (grad_hidden, grad_weight, grad_bias)
                )
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None

    @staticmethod
    def _recompute_grads(ctx, grad_loss):
        hidden, weight, bias, labels, e_hat, kept = ctx.saved_tensors
        mode, ratio_clip, ignore_index, chunk_size, _, grad_flags, acc = ctx.opts
        valid = labels != ignore_index
        target = torch.where(valid, labels, 0)
        grad_loss = grad_loss if kept is None else grad_loss.index_select(0, kept)
        scale = torch.where(valid, grad_loss.to(acc), 0.0)
        grads = _Grads(hidden, weight, bias, grad_flags, acc, kept, ctx.full_rows)
        n = hidden.shape[0]
        buffers = _chunk_buffers(hidden, weight.shape[0], chunk_size, acc)
        for start in range(0, n, chunk_size):
            sl = slice(start, min(start + chunk_size, n))
            chunk = _chunk_stats(hidden[sl], weight, bias, target[sl], e_hat, buffers, mode, ratio_clip)
            grads.add(sl, hidden[sl], _logit_grad_(chunk, target[sl], scale[sl]))
            del chunk
        return grads.result()


class _Grads:
    """Accumulates the projections of chunk logit gradients; weight and bias gradients are summed in ``acc``
    (float32, or float64 for float64 inputs). With ``kept``, chunk rows are the rows ``kept`` of a hidden-state
    tensor of ``full_rows`` rows whose other rows get zero gradient."""

    def __init__(self, hidden, weight, bias, grad_flags, acc, kept, full_rows):
        want_hidden, want_weight, want_bias = grad_flags
        self.weight, self.acc, self.kept = weight, acc, kept
        self.hidden_dtype, self.weight_dtype = hidden.dtype, weight.dtype
        self.bias_dtype = None if bias is None else bias.dtype
        self.grad_hidden = None
        if want_hidden:
            shape = (full_rows, hidden.shape[1])
            self.grad_hidden = torch.empty_like(hidden) if kept is None else hidden.new_zeros(shape)
        self.grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_weight else None
        self.grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if want_bias else None

    def add(self, sl: slice, hidden_chunk: torch.Tensor, logit_grad: torch.Tensor) -> None:
        if self.grad_hidden is not None and self.kept is None:
            torch.mm(logit_grad.to(self.weight_dtype), self.weight, out=self.grad_hidden[sl])
        elif self.grad_hidden is not None:
            self.grad_hidden.index_copy_(0, self.kept[sl], logit_grad.to(self.weight_dtype) @ self.weight)
        if self.grad_weight is not None:
            self.grad_weight.addmm_(logit_grad.T, hidden_chunk.to(self.acc))
        if self.grad_bias is not None:
            self.grad_bias += logit_grad.sum(0)

    def result(self):
        grad_weight = None if self.grad_weight is None else self.grad_weight.to(self.weight_dtype)
        grad_bias = None if self.grad_bias is None else self.grad_bias.to(self.bias_dtype)
        return self.grad_hidden, grad_weight, grad_bias


def fused_emo_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    lm_head_bias: torch.Tensor | None = None,
    cost_embedding: torch.Tensor | None = None,
    mode: str = "mix",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    ratio_clip: float | None = None,
    chunk_size: int | None = None,
    return_parts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, EMOLossParts]:
    """EMO loss of ``hidden_states @ lm_head_weight.T + lm_head_bias`` without materialising those logits.

    Same value and gradients (w.r.t. hidden states, weight and bias) as
    ``emo_loss(hidden_states @ lm_head_weight.T + lm_head_bias, labels, cost_embedding, ...)``; works over chunks of
    ``chunk_size`` tokens, computing the gradients during the forward when the reduction is a scalar.

    Args:
        hidden_states: ``[..., H]`` final hidden states (labels aligned: shift them first for causal LMs).
        lm_head_weight: ``[V, H]`` output embedding.
        labels: ``[...]`` integer targets; ``ignore_index`` marks positions that do not count.
        lm_head_bias: optional ``[V]`` output bias.
        cost_embedding: ``[V, D]`` embedding defining the cost, used detached; ``None`` means the current
            ``lm_head_weight`` (the official "adaptive" cost).
        mode: ``"mix"``, ``"emo2"``, ``"emo"`` or ``"ce"`` (see the module docstring).
        ignore_index: label value to ignore.
        reduction: ``"mean"`` over non-ignored tokens, ``"sum"`` or ``"none"``.
        num_items_in_batch: with ``reduction="mean"``, divide the sum by this count instead.
        ratio_clip: upper bound of the detached ratio in ``"mix"``/``"emo2"``.
        chunk_size: tokens per chunk; default :func:`default_chunk_size`.
        return_parts: also return detached CE/EMO sums for logging.

    Returns:
        The loss in float32 (float64 for float64 weights) (scalar, or ``labels.shape`` for ``reduction="none"``), and :class:`EMOLossParts` if asked.

    Raises:
        ValueError: unknown mode/reduction, shape or vocab mismatch, labels out of range, bad chunk size.
        TypeError: non-integer labels or a non-floating cost embedding.
    """
    _check_options(mode, reduction, num_items_in_batch, ratio_clip)
    if lm_head_weight.dim() != 2:
        raise ValueError(f"lm_head_weight must be 2-D [vocab, hidden], got shape {tuple(lm_head_weight.shape)}")
    vocab_size, hidden_size = lm_head_weight.shape
    if hidden_states.shape[-1] != hidden_size:
        raise ValueError(
            f"hidden size mismatch: hidden_states end in {hidden_states.shape[-1]} but lm_head_weight is "
            f"{tuple(lm_head_weight.shape)}"
        )
    if lm_head_bias is not None and lm_head_bias.shape != (vocab_size,):
        raise ValueError(f"lm_head_bias must have shape ({vocab_size},), got {tuple(lm_head_bias.shape)}")
    _check_labels(labels, hidden_states.shape[:-1], vocab_size, ignore_index)
    if cost_embedding is None:
        cost = lm_head_weight.detach()
    else:
        _check_cost_embedding(cost_embedding, vocab_size, "lm_head_weight")
        cost = cost_embedding.detach()
        if cost.device != lm_head_weight.device:
            raise ValueError(f"cost_embedding is on {cost.device} but lm_head_weight is on {lm_head_weight.device}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")

    hidden = hidden_states.reshape(-1, hidden_size)
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    num_valid = valid.sum()
    denominator = _denominator(reduction, num_valid, num_items_in_batch)
    grad_enabled = torch.is_grad_enabled()
    grad_flags = tuple(
        grad_enabled and t is not None and t.requires_grad for t in (hidden, lm_head_weight, lm_head_bias)
    )
    # Ignored positions (padding, prompts) contribute nothing: leave them out of every matmul.
    kept = None if bool(valid.all()) else valid.nonzero().squeeze(1)
    chunk = chunk_size or default_chunk_size(max(1, int(num_valid)), hidden_size, vocab_size)
    acc = torch.float64 if lm_head_weight.dtype == torch.float64 else torch.float32
    # Normalised once per call (it is V×D, the chunks are C×V); low-precision costs stay low precision so the
    # similarity matmul runs as fast as the logits one.
    e_hat_dtype = acc if cost.dtype in (torch.float32, torch.float64) else cost.dtype
    e_hat = F.normalize(cost.to(acc), dim=-1, eps=_NORM_EPS).to(e_hat_dtype)

    per_token = reduction == "none"
    opts = (mode, ratio_clip, ignore_index, chunk, per_token, grad_flags, acc)
    loss, mle_sum, emo_sum = _FusedEMOFunction.apply(
        hidden, lm_head_weight, lm_head_bias, flat_labels, e_hat, denominator, kept, opts
    )
    if per_token:
        loss = loss.reshape(labels.shape)
    if not return_parts:
        return loss
    return loss, EMOLossParts(mle_sum, emo_sum, num_valid)
