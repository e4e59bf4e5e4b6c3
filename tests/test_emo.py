"""EMO loss math: emo_loss against an independent float64 implementation of the official formulas, and
fused_emo_loss against emo_loss on materialised logits (values and gradients), for every mode and reduction."""

from __future__ import annotations

import pytest
import torch

from hf_su.trainer.emo import EMOLossParts, default_chunk_size, emo_loss, fused_emo_loss

MODES = ("mix", "emo2", "emo", "ce")
# (reduction, num_items_in_batch): num_items_in_batch is the Trainer's gradient-accumulation convention
REDUCTIONS = [("mean", None), ("sum", None), ("none", None), ("mean", 61), ("mean", "tensor")]
N, H, V, D = 37, 16, 50, 8


def official_formula_float64(logits, labels, cost, mode, reduction, num_items, ratio_clip=None):
    """The official code's formulas written out naively in float64: explicit one-hot, a V×V cosine matrix,
    q_final = q - stopgrad(q * onehot), ratios with +1e-10, masked sum."""
    z = logits.double()
    mask = labels != -100
    y = torch.where(mask, labels, 0)
    onehot = torch.nn.functional.one_hot(y, z.shape[-1]).double()
    q = torch.exp(z - z.max(-1, keepdim=True).values)
    q = q / q.sum(-1, keepdim=True)
    mle = torch.log(torch.exp(z).sum(-1)) - (z * onehot).sum(-1)
    e = cost.double()
    e_hat = e / e.norm(dim=-1, keepdim=True)
    cosine = e_hat @ e_hat.T  # [V, V]
    q_final = q - (q * onehot).detach()
    emo = 1 - (q_final * cosine[y]).sum(-1)
    if mode == "mix":
        ratio = (mle / (emo + 1e-10)).detach()
        ratio = ratio if ratio_clip is None else torch.clamp(ratio, max=ratio_clip)
        loss = 0.5 * (mle + ratio * emo)
    elif mode == "emo2":
        ratio = (emo / (mle + 1e-10)).detach()
        ratio = ratio if ratio_clip is None else torch.clamp(ratio, max=ratio_clip)
        loss = ratio * mle + emo
    elif mode == "emo":
        loss = emo
    else:
        loss = mle
    loss = loss * mask
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (float(num_items) if num_items is not None else mask.sum())


def _num_items(spec, labels):
    if spec == "tensor":
        return torch.tensor(int((labels != -100).sum()) + 9)
    return spec


def _labels(shape, vocab=V, seed=1, ignored_every=5):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels.view(-1)[::ignored_every] = -100
    return labels


def _problem(dtype, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (0.4 * torch.randn(V, H, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(V, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_() if bias else None
    cost = torch.randn(V, D, generator=gen, dtype=torch.float64).to(dtype)
    return hidden, weight, b, cost, _labels((N,))


def _close(actual, expected, dtype, scale=None):
    """Relative comparison against the magnitude of the expected tensor (gradients have tiny entries)."""
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().clamp(min=1e-30) if scale is None else scale
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * float(scale))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction,num_items", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_emo_loss_matches_float64_formula(mode, reduction, num_items, dtype):
    gen = torch.Generator().manual_seed(3)
    logits64 = 2 * torch.randn(N, V, generator=gen, dtype=torch.float64)
    cost = torch.randn(V, D, generator=gen, dtype=torch.float64)
    labels = _labels((N,))
    num_items = _num_items(num_items, labels)
    upstream = torch.rand(N, generator=gen, dtype=torch.float64) if reduction == "none" else torch.tensor(1.0)

    ref_logits = logits64.clone().requires_grad_()
    expected = official_formula_float64(ref_logits, labels, cost, mode, reduction, num_items)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), ref_logits)

    logits = logits64.to(dtype).requires_grad_()
    loss = emo_loss(logits, labels, cost.to(dtype), mode=mode, reduction=reduction, num_items_in_batch=num_items)
    (grad,) = torch.autograd.grad((loss * upstream.to(loss.dtype)).sum(), logits)
    assert loss.shape == expected.shape
    _close(loss, expected, dtype)
    _close(grad, expected_grad, dtype)


@pytest.mark.parametrize("mode,clip", [("mix", 1.5), ("emo2", 0.2)])
def test_ratio_clip_matches_formula(mode, clip):
    gen = torch.Generator().manual_seed(4)
    logits = (3 * torch.randn(N, V, generator=gen, dtype=torch.float64)).requires_grad_()
    cost = torch.randn(V, D, generator=gen, dtype=torch.float64)
    labels = _labels((N,))
    expected = official_formula_float64(logits, labels, cost, mode, "mean", None, ratio_clip=clip)
    unclipped = official_formula_float64(logits, labels, cost, mode, "mean", None)
    assert not torch.allclose(expected, unclipped)  # the clip is active on this data
    (expected_grad,) = torch.autograd.grad(expected, logits)
    loss = emo_loss(logits, labels, cost, mode=mode, ratio_clip=clip)
    (grad,) = torch.autograd.grad(loss, logits)
    _close(loss, expected, torch.float64)
    _close(grad, expected_grad, torch.float64)
    hidden, weight, bias, cost32, labels = _problem(torch.float64)
    ref = emo_loss(hidden @ weight.T + bias, labels, cost32, mode=mode, ratio_clip=clip)
    fused = fused_emo_loss(
        hidden, weight, labels, lm_head_bias=bias, cost_embedding=cost32, mode=mode, ratio_clip=clip, chunk_size=10
    )
    _close(fused, ref, torch.float64)


def test_emo_value_tends_to_one_for_a_confident_model():
    """The official value convention: the target's own probability is removed from the value, so a model that is
    sure of the target gets emo ≈ 1 (not 0), while its gradient still pushes the target up."""
    logits = torch.full((1, V), -30.0, dtype=torch.float64)
    logits[0, 7] = 30.0
    logits.requires_grad_()
    cost = torch.randn(V, D, dtype=torch.float64)
    loss = emo_loss(logits, torch.tensor([7]), cost, mode="emo")
    assert loss.item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction,num_items", REDUCTIONS)
@pytest.mark.parametrize("cost_kind", ["adaptive", "fixed"])
def test_fused_matches_emo_loss_fp32(mode, reduction, num_items, cost_kind):
    hidden, weight, bias, cost, labels = _problem(torch.float32)
    num_items = _num_items(num_items, labels)
    gen = torch.Generator().manual_seed(5)
    upstream = torch.rand(N, generator=gen) if reduction == "none" else torch.tensor(1.0)
    kwargs = dict(mode=mode, reduction=reduction, num_items_in_batch=num_items)

    ref = emo_loss(hidden @ weight.T + bias, labels, weight if cost_kind == "adaptive" else cost, **kwargs)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (hidden, weight, bias))
    fused_cost = None if cost_kind == "adaptive" else cost
    for chunk_size in (1, 5, 8, 16, 37, 64):  # 5 and 16 do not divide N=37
        out = fused_emo_loss(
            hidden, weight, labels, lm_head_bias=bias, cost_embedding=fused_cost, chunk_size=chunk_size, **kwargs
        )
        grads = torch.autograd.grad((out * upstream).sum(), (hidden, weight, bias))
        assert out.shape == ref.shape
        _close(out, ref, torch.float32)
        for g, r in zip(grads, ref_grads):
            _close(g, r, torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_fused_matches_float64_formula(mode):
    """The handwritten chunk gradient against autograd through the naive float64 formulas."""
    hidden, weight, bias, cost, some_ignored = _problem(torch.float64)
    none_ignored = some_ignored.clamp(min=0)
    for cost_kind, labels in [("adaptive", some_ignored), ("fixed", some_ignored), ("adaptive", none_ignored)]:
        expected = official_formula_float64(
            hidden @ weight.T + bias, labels, weight.detach() if cost_kind == "adaptive" else cost, mode, "mean", None
        )
        expected_grads = torch.autograd.grad(expected, (hidden, weight, bias))
        out = fused_emo_loss(
            hidden, weight, labels, lm_head_bias=bias, cost_embedding=None if cost_kind == "adaptive" else cost,
            mode=mode, chunk_size=6,
        )  # fmt: skip
        grads = torch.autograd.grad(out, (hidden, weight, bias))
        _close(out, expected, torch.float64)
        for g, r in zip(grads, expected_grads):
            _close(g, r, torch.float64)


def test_fused_batched_shapes_without_bias_and_scaled_upstream():
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(3, 11, H, generator=gen).requires_grad_()
    weight = (0.4 * torch.randn(V, H, generator=gen)).requires_grad_()
    labels = _labels((3, 11))
    ref = emo_loss(hidden @ weight.T, labels, weight)
    ref_grads = torch.autograd.grad(2.5 * ref, (hidden, weight))
    out = fused_emo_loss(hidden, weight, labels, chunk_size=4)
    grads = torch.autograd.grad(2.5 * out, (hidden, weight))  # a non-unit upstream gradient
    _close(out, ref, torch.float32)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        _close(g, r, torch.float32)
    for rows in (labels, labels.clamp(min=0)):  # with and without ignored positions
        per_token = fused_emo_loss(hidden, weight, rows, reduction="none", chunk_size=4)
        ref_per_token = emo_loss(hidden @ weight.T, rows, weight, reduction="none")
        assert per_token.shape == rows.shape
        _close(per_token, ref_per_token, torch.float32)
        upstream = torch.rand(rows.shape, generator=gen)
        grads = torch.autograd.grad((per_token * upstream).sum(), (hidden, weight))
        ref_grads = torch.autograd.grad((ref_per_token * upstream).sum(), (hidden, weight))
        for g, r in zip(grads, ref_grads):
            _close(g, r, torch.float32)


def test_fused_frozen_weight_and_no_grad():
    hidden, weight, bias, _, labels = _problem(torch.float32)
    frozen = weight.detach()
    ref = emo_loss(hidden @ frozen.T, labels, frozen)
    (ref_grad,) = torch.autograd.grad(ref, hidden)
    out = fused_emo_loss(hidden, frozen, labels, chunk_size=7)
    (grad,) = torch.autograd.grad(out, hidden)  # only hidden needs a gradient (e.g. a frozen head under LoRA)
    _close(grad, ref_grad, torch.float32)
    with torch.no_grad():
        value = fused_emo_loss(hidden, weight, labels, lm_head_bias=bias)
    assert not value.requires_grad
    _close(value, emo_loss(hidden @ weight.T + bias, labels, weight).detach(), torch.float32)


def test_fused_low_precision_inputs():
    hidden, weight, bias, _, labels = _problem(torch.float32)
    ref = emo_loss(hidden @ weight.T + bias, labels, weight)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    h16, w16 = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    out = fused_emo_loss(h16, w16, labels, lm_head_bias=bias.detach().bfloat16(), chunk_size=8)
    grads = torch.autograd.grad(out, (h16, w16))
    assert out.dtype == torch.float32
    assert grads[0].dtype == grads[1].dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.detach(), rtol=3e-2, atol=3e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r, rtol=5e-2, atol=5e-2 * r.abs().max().item())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_items", [None, 0])
def test_all_ignored_labels_give_zero_loss_and_zero_grads(mode, num_items):
    hidden, weight, bias, cost, _ = _problem(torch.float32)
    labels = torch.full((N,), -100)
    logits = (hidden @ weight.T + bias).detach().requires_grad_()
    ref = emo_loss(logits, labels, cost, mode=mode, num_items_in_batch=num_items)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    assert ref.item() == 0.0 and torch.count_nonzero(ref_grad) == 0
    out = fused_emo_loss(hidden, weight, labels, lm_head_bias=bias, mode=mode, num_items_in_batch=num_items)
    grads = torch.autograd.grad(out, (hidden, weight, bias))
    assert out.item() == 0.0
    for g in grads:
        assert torch.isfinite(g).all() and torch.count_nonzero(g) == 0


def test_parts_report_cross_entropy_and_emo_sums():
    hidden, weight, bias, cost, labels = _problem(torch.float64)
    logits = hidden @ weight.T + bias
    mask = labels != -100
    ce_sum = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    emo_sum = official_formula_float64(logits, labels, cost, "emo", "sum", None)
    for fn in (
        lambda: emo_loss(logits, labels, cost, return_parts=True),
        lambda: fused_emo_loss(hidden, weight, labels, lm_head_bias=bias, cost_embedding=cost, chunk_size=9,
                               return_parts=True),
    ):  # fmt: skip
        _, parts = fn()
        assert isinstance(parts, EMOLossParts)
        assert int(parts.num_tokens) == int(mask.sum())
        _close(parts.ce_sum, ce_sum, torch.float64)
        _close(parts.emo_sum, emo_sum, torch.float64)
        assert not parts.ce_sum.requires_grad


def test_default_chunk_size():
    assert default_chunk_size(8192, 1024, 32000) == 1024  # chunk×V ≈ 2^25
    assert default_chunk_size(8192, 4096, 152064) == 256  # Liger: 8192 / ceil(152064 / 4096) -> 256
    assert default_chunk_size(100, 64, 512) == 100  # never more than the tokens
    assert default_chunk_size(1 << 16, 4096, 32000) == 8192  # Liger's rule: chunk×V ≈ N×H


def test_clear_errors():
    hidden, weight, bias, cost, labels = _problem(torch.float32)
    logits = hidden @ weight.T
    with pytest.raises(ValueError, match="unknown EMO mode"):
        emo_loss(logits, labels, cost, mode="emo3")
    with pytest.raises(ValueError, match="unknown EMO mode"):
        fused_emo_loss(hidden, weight, labels, mode="EMO")
    with pytest.raises(ValueError, match="unknown reduction"):
        emo_loss(logits, labels, cost, reduction="avg")
    with pytest.raises(ValueError, match="vocab size mismatch"):
        emo_loss(logits, labels, cost[:-1])
    with pytest.raises(ValueError, match="vocab size mismatch"):
        fused_emo_loss(hidden, weight, labels, cost_embedding=torch.randn(V + 3, D))
    with pytest.raises(ValueError, match="hidden size mismatch"):
        fused_emo_loss(hidden[:, :-1], weight, labels)
    with pytest.raises(ValueError, match="labels shape"):
        emo_loss(logits, labels[:-1], cost)
    with pytest.raises(ValueError, match="labels must lie"):
        fused_emo_loss(hidden, weight, torch.full((N,), V))
    with pytest.raises(TypeError, match="integer"):
        emo_loss(logits, labels.float(), cost)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        emo_loss(logits, labels, cost, reduction="sum", num_items_in_batch=10)
    with pytest.raises(ValueError, match="ratio_clip"):
        emo_loss(logits, labels, cost, mode="ce", ratio_clip=3.0)
    with pytest.raises(ValueError, match="ratio_clip"):
        fused_emo_loss(hidden, weight, labels, ratio_clip=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_emo_loss(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="lm_head_bias"):
        fused_emo_loss(hidden, weight, labels, lm_head_bias=bias[:-1])
