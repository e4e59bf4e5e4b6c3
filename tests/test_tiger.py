"""Tiger optimizer: Su's update rule against an independent float64 implementation, the embedding anomaly and its
lazy fix, the multi-tensor / per-tensor / step-in-backward paths, state round trips, and Transformers integration."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from hf_su.testing import tiny_causal_lm
from hf_su.trainer.tiger import Tiger, _sign_step, tiger_param_groups


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny: one thread avoids oversubscription stalls on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- independent float64 reference


def reference_tiger(theta, grads, *, rule, lr, beta, k, shrink=0.99, min_rms=1e-3):
    """Su's Tiger (bojone/tiger tiger.py, per micro-step) plus the lazy-row rule, written directly in float64.

    ``rule`` = dict(scale="rms" | "row_rms" | float, weight_decay, center, lazy). Returns theta after each micro-step.
    """
    theta = theta.to(torch.float64).clone()
    m = torch.zeros_like(theta)
    touched = None
    out = []
    for t, g in enumerate(grads):
        g = g.to(torch.float64)
        start, end = t % k == 0, (t + 1) % k == 0
        b1, b2 = (beta if start else 1.0), (1 - beta) / k
        rows_now = (g != 0).any(-1)
        if rule["lazy"]:
            touched = rows_now if start else touched | rows_now
        if not torch.isfinite(g).all():
            shrunk = (theta - rule["center"]) * shrink + rule["center"]
            theta = torch.where(rows_now.unsqueeze(-1), shrunk, theta) if rule["lazy"] else shrunk
        else:
            m = b1 * m + b2 * g
            if end:
                if rule["scale"] == "rms":
                    eta = lr * max(theta.pow(2).mean().sqrt().item(), min_rms)
                elif rule["scale"] == "row_rms":
                    eta = lr * theta.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(min_rms)
                else:
                    eta = lr * rule["scale"]
                updated = theta - eta * (torch.sign(m) + rule["weight_decay"] * theta)
                theta = torch.where(touched.unsqueeze(-1), updated, theta) if rule["lazy"] else updated
        out.append(theta.clone())
    return out


RULES = {
    "matrix": dict(shape=(6, 5), scale="rms", weight_decay=0.1, center=0.0, lazy=False),
    "zero_matrix": dict(shape=(3, 4), scale="rms", weight_decay=0.1, center=0.0, lazy=False),
    "embedding": dict(shape=(7, 4), scale="row_rms", weight_decay=0.1, center=0.0, lazy=True),
    "embedding_eager": dict(shape=(7, 4), scale="row_rms", weight_decay=0.1, center=0.0, lazy=False),
    "gain": dict(shape=(5,), scale=0.5, weight_decay=0.0, center=1.0, lazy=False),
    "bias": dict(shape=(5,), scale=0.5, weight_decay=0.0, center=0.0, lazy=False),
}


def _init_value(name, shape, generator):
    if name == "zero_matrix":
        return torch.zeros(shape, dtype=torch.float64)
    value = torch.randn(shape, generator=generator, dtype=torch.float64) * 0.3
    return value + 1.0 if name == "gain" else value


def _gradients(name, shape, steps, generator):
    """Random gradients; embedding rows are often all-zero; some micro-steps carry NaN or Inf."""
    grads = []
    for t in range(steps):
        g = torch.randn(shape, generator=generator, dtype=torch.float64)
        if name.startswith("embedding"):
            g[torch.rand(shape[0], generator=generator) < 0.5] = 0.0
            g[0] = 0.0  # a row that never gets a gradient
        if t == 2:
            g.view(-1)[-2] = math.nan
        if t == 5 and name in ("matrix", "gain", "embedding"):
            g.view(-1)[-1] = -math.inf
        grads.append(g)
    return grads


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per_tensor"])
@pytest.mark.parametrize("k", [1, 4])
def test_matches_float64_reference_for_every_kind(k, foreach):
    gen = torch.Generator().manual_seed(1)
    steps = 12
    lr, beta = 0.02, 0.9
    params, grads, groups = {}, {}, []
    for name, rule in RULES.items():
        params[name] = nn.Parameter(_init_value(name, rule["shape"], gen))
        grads[name] = _gradients(name, rule["shape"], steps, gen)
        groups.append(
            dict(
                params=[params[name]],
                lr_scale=rule["scale"],
                weight_decay=rule["weight_decay"],
                center=rule["center"],
                lazy=rule["lazy"],
            )
        )
    initial = {name: p.detach().clone() for name, p in params.items()}
    expected = {
        name: reference_tiger(params[name].detach(), grads[name], rule=rule, lr=lr, beta=beta, k=k)
        for name, rule in RULES.items()
    }
    opt = Tiger(groups, lr=lr, beta=beta, grad_accum_steps=k, foreach=foreach)
    for t in range(steps):
        for name, p in params.items():
            p.grad = grads[name][t].clone()
        opt.step()
        for name, p in params.items():
            torch.testing.assert_close(p.detach(), expected[name][t], rtol=1e-12, atol=1e-12, msg=f"{name} t={t}")
    # the reference moved everything (incl. the zero-initialised matrix, thanks to the RMS floor) ...
    assert params["zero_matrix"].abs().min() > 0
    # ... except the lazy embedding's never-touched row, which is bitwise unchanged
    assert torch.equal(params["embedding"][0], initial["embedding"][0])
    assert not torch.equal(params["embedding_eager"][0], initial["embedding_eager"][0])


def test_shape_defaults_without_groups_follow_su():
    """Plain parameters: matrices scale by RMS with decay, vectors by 0.5 without decay."""
    w = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    b = nn.Parameter(torch.randn(3, dtype=torch.float64))
    gw, gb = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    ew = reference_tiger(
        w.detach(), [gw], rule=dict(scale="rms", weight_decay=0.05, center=0, lazy=False), lr=0.1, beta=0.9, k=1
    )
    eb = reference_tiger(
        b.detach(), [gb], rule=dict(scale=0.5, weight_decay=0.0, center=0, lazy=False), lr=0.1, beta=0.9, k=1
    )
    opt = Tiger([w, b], lr=0.1, beta=0.9, weight_decay=0.05)
    w.grad, b.grad = gw, gb
    opt.step()
    torch.testing.assert_close(w.detach(), ew[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.detach(), eb[0], rtol=1e-12, atol=1e-12)


def test_accumulation_equals_one_step_on_the_mean_gradient():
    """k micro-steps with Tiger's buffer-free accumulation == one step on the averaged gradient."""
    torch.manual_seed(0)
    w1 = nn.Parameter(torch.randn(8, 6, dtype=torch.float64))
    w2 = nn.Parameter(w1.detach().clone())
    micro = [torch.randn(3, 8, 6, dtype=torch.float64) for _ in range(2)]  # two cycles of 3 micro-batches
    acc = Tiger([w1], lr=0.05, beta=0.9, grad_accum_steps=3)
    one = Tiger([w2], lr=0.05, beta=0.9)
    for cycle in micro:
        for g in cycle:
            w1.grad = g.clone()
            acc.step()
        w2.grad = cycle.mean(0)
        one.step()
    torch.testing.assert_close(w1, w2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.state[w1]["momentum"], one.state[w2]["momentum"], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- paths agree


def _tiny_lm(**overrides):
    config = dict(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
    )
    config.update(overrides)
    return tiny_causal_lm("llama", **config).train()


def _batches(n, vocab=64, low=3, high=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(low, high, (2, 8), generator=gen) for _ in range(n)]


def _train(model, opt, batches, *, step_in_backward=False):
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        if not step_in_backward:
            opt.zero_grad()


def test_without_rms_scaling_equals_lion_pytorch_with_equal_betas():
    """Tiger's core rule against an independent package: with a constant ``lr_scale=1`` it is Lion with
    ``beta1 = beta2`` (lucidrains' lion-pytorch), step for step on a language model, decay and no-decay groups."""
    lion_pytorch = pytest.importorskip("lion_pytorch")
    base = _tiny_lm().to(torch.float64)
    models = [copy.deepcopy(base) for _ in range(2)]

    def groups(model, **extra):
        matrices = [p for p in model.parameters() if p.ndim >= 2]
        vectors = [p for p in model.parameters() if p.ndim < 2]
        return [dict(params=matrices, **extra), dict(params=vectors, weight_decay=0.0, **extra)]

    tiger = Tiger(groups(models[0], lr_scale=1.0), lr=3e-3, beta=0.9, weight_decay=0.5)
    lion = lion_pytorch.Lion(groups(models[1]), lr=3e-3, betas=(0.9, 0.9), weight_decay=0.5)
    for opt, model in zip((tiger, lion), models):
        _train(model, opt, _batches(6))
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert not torch.equal(models[0].lm_head.weight, base.lm_head.weight)


@pytest.mark.parametrize("k", [1, 2])
def test_foreach_equals_per_tensor_and_step_in_backward(k):
    base = _tiny_lm()
    batches = _batches(4)
    results = []
    for kwargs in (dict(foreach=True), dict(foreach=False), dict(step_in_backward=True)):
        model = copy.deepcopy(base)
        opt = Tiger(tiger_param_groups(model, weight_decay=0.1), lr=0.01, grad_accum_steps=k, **kwargs)
        _train(model, opt, batches, step_in_backward=kwargs.get("step_in_backward", False))
        if kwargs.get("step_in_backward"):
            assert all(p.grad is None for p in model.parameters())  # each gradient was folded in and freed
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for other in results[1:]:
        for name, value in results[0].items():
            assert torch.equal(value, other[name]), name
    assert not torch.equal(results[0]["model.norm.weight"], base.model.norm.weight)


def test_sign_step_scratch_and_foreach_variants_agree():
    """The CPU scratch-buffer variant and the _foreach_ variant (used on accelerators) give identical updates."""
    moms = [torch.randn(5, 3), torch.zeros(4), torch.randn(2, 2, 2)]
    moms[2][0] = 0.0
    start = [torch.randn_like(m) for m in moms]
    etas = [0.1, 0.2, 0.3]
    results = []
    for reuse_scratch in (True, False):
        params = [p.clone() for p in start]
        _sign_step(params, moms, etas, reuse_scratch=reuse_scratch)
        results.append(params)
    for a, b, p, m, eta in zip(*results, start, moms, etas):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, p - eta * m.sign(), rtol=0, atol=0)


def test_removed_hooks_and_copies_step_in_the_ordinary_way():
    model = _tiny_lm()
    opt = Tiger(model.parameters(), grad_accum_steps=2, step_in_backward=True)
    clone = copy.deepcopy(opt)
    assert not clone.step_in_backward and clone.param_groups[0]["grad_accum_steps"] == 2
    opt.remove_hooks()
    ids = _batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.lm_head.weight.grad is not None  # hooks gone: gradients stay for an ordinary step()


# ----------------------------------------------------------------------------- precision and state


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per_tensor"])
def test_bf16_params_keep_fp32_momentum_and_round_trip(foreach):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(16, 8).to(torch.bfloat16))
    w_ref = w.detach().float().clone()
    grads = [torch.randn(16, 8) for _ in range(3)]
    opt = Tiger([w], lr=0.05, beta=0.9, weight_decay=0.1, foreach=foreach)
    m_ref = torch.zeros(16, 8)
    for g in grads:
        w.grad = g.to(torch.bfloat16)
        opt.step()
        g32 = g.to(torch.bfloat16).float()
        m_ref = torch.lerp(m_ref, g32, 0.1)
        eta = 0.05 * max(w_ref.pow(2).mean().sqrt().item(), 1e-3)
        w_ref = (w_ref - eta * (m_ref.sign() + 0.1 * w_ref)).to(torch.bfloat16).float()
    assert opt.state[w]["momentum"].dtype == torch.float32
    torch.testing.assert_close(opt.state[w]["momentum"], m_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w.detach().float(), w_ref, rtol=0, atol=0)

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    restored = Tiger([nn.Parameter(w.detach().clone())], lr=0.05)
    restored.load_state_dict(torch.load(buffer))
    momentum = next(iter(restored.state.values()))["momentum"]
    assert momentum.dtype == torch.float32 and torch.equal(momentum, opt.state[w]["momentum"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_save_and_resume_mid_cycle_continues_identically(dtype):
    base = _tiny_lm(dtype=dtype)
    batches = _batches(6, seed=3)

    model = copy.deepcopy(base)
    opt = Tiger(tiger_param_groups(model), lr=0.01, grad_accum_steps=2)
    _train(model, opt, batches[:3])  # stops in the middle of an accumulation cycle
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _train(model, opt, batches[3:])

    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = copy.deepcopy(base)
    resumed.load_state_dict(saved["model"])
    opt2 = Tiger(tiger_param_groups(resumed), lr=0.01, grad_accum_steps=2)
    opt2.load_state_dict(saved["opt"])
    _train(resumed, opt2, batches[3:])
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- the embedding anomaly


def test_embedding_anomaly_reproduced_and_fixed_by_lazy_rows():
    """Tokens seen once then never again (and tokens never seen) under Tiger with weight decay lambda:
    eager updates drive the rare rows to +-1/lambda (Su, blog 9736); lazy rows leave them untouched."""
    wd = 0.1
    base = _tiny_lm()
    rare, unseen = torch.arange(40, 48), torch.arange(48, 64)
    first = torch.cat([rare.view(2, 4), torch.randint(3, 40, (2, 4))], dim=1)
    batches = [first] + _batches(60, seed=5)

    final = {}
    for lazy in (False, True):
        model = copy.deepcopy(base)
        groups = tiger_param_groups(model, weight_decay=wd, lazy_embeddings=lazy)
        for group in groups:  # a big embedding lr shows the drift in a few cheap steps; the rest trains gently
            group["lr"] = 0.3 if group["lr_scale"] == "row_rms" else 1e-3
        opt = Tiger(groups, lr=1e-3)
        _train(model, opt, batches[:1])
        after_first = model.model.embed_tokens.weight.detach().clone()
        _train(model, opt, batches[1:])
        final[lazy] = (after_first, model.model.embed_tokens.weight.detach().clone())

    _, eager = final[False]
    assert torch.allclose(eager[rare].abs(), torch.full_like(eager[rare], 1 / wd), rtol=1e-3)
    assert eager[unseen].abs().max() < base.model.embed_tokens.weight[unseen].abs().max()  # decayed: changed
    after_first, lazy_final = final[True]
    assert torch.equal(lazy_final[rare], after_first[rare])
    assert torch.equal(lazy_final[unseen], base.model.embed_tokens.weight[unseen])
    assert lazy_final[rare].abs().max() < 1.0
    seen = torch.arange(3, 40)
    assert not torch.equal(lazy_final[seen], after_first[seen])  # frequent tokens still train


# ----------------------------------------------------------------------------- parameter groups


def _group_of(groups, param):
    return next(g for g in groups if any(p is param for p in g["params"]))


def test_param_groups_classify_llama_by_module_type():
    model = tiny_causal_lm("llama")
    groups = tiger_param_groups(model, weight_decay=0.05)
    emb = _group_of(groups, model.model.embed_tokens.weight)
    assert (emb["lr_scale"], emb["lazy"], emb["weight_decay"]) == ("row_rms", True, 0.05)
    mat = _group_of(groups, model.model.layers[0].self_attn.q_proj.weight)
    assert (mat["lr_scale"], mat["weight_decay"]) == ("rms", 0.05)
    assert _group_of(groups, model.lm_head.weight) is mat
    gain = _group_of(groups, model.model.norm.weight)
    assert (gain["lr_scale"], gain["weight_decay"], gain["center"]) == (0.5, 0.0, 1.0)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_param_groups_biases_offset_gains_tied_embeddings_and_peft():
    gpt2 = tiny_causal_lm("gpt2")  # LayerNorm gains and biases; lm_head tied to wte
    groups = tiger_param_groups(gpt2)
    assert _group_of(groups, gpt2.transformer.h[0].ln_1.weight)["center"] == 1.0
    bias = _group_of(groups, gpt2.transformer.h[0].ln_1.bias)
    assert (bias["lr_scale"], bias["center"], bias["weight_decay"]) == (0.5, 0.0, 0.0)
    assert _group_of(groups, gpt2.lm_head.weight)["lr_scale"] == "row_rms"  # tied: one parameter, embedding rule
    assert sum(len(g["params"]) for g in groups) == len(list(gpt2.parameters()))

    gemma = tiny_causal_lm("gemma")  # x * (1 + w) gains initialised at 0: their neutral value is 0
    assert _group_of(tiger_param_groups(gemma), gemma.model.norm.weight)["center"] == 0.0

    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_tiny_lm(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    groups = tiger_param_groups(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [g["lr_scale"] for g in groups] == ["rms"] and len(groups[0]["params"]) == len(trainable)
    opt = Tiger(groups, lr=1e-2)
    _train(model, opt, _batches(2))
    lora_b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert lora_b.abs().min() > 0  # zero-initialised, moves thanks to the RMS floor (lr * min_rms per step)


# ----------------------------------------------------------------------------- validation


def test_bad_input_is_refused_clearly():
    w = nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="grad_accum_steps"):
        Tiger([w], grad_accum_steps=0)
    with pytest.raises(ValueError, match="beta"):
        Tiger([w], beta=1.0)
    with pytest.raises(ValueError, match="lr_scale"):
        Tiger([{"params": [w], "lr_scale": "bogus"}])
    with pytest.raises(TypeError, match="lazy"):
        Tiger([{"params": [w], "lazy": 1}])
    with pytest.raises(TypeError, match="complex"):
        Tiger([nn.Parameter(torch.randn(2, dtype=torch.complex64))])
    opt = Tiger([w])
    with pytest.raises(ValueError, match="shrink_ratio"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2))], "shrink_ratio": 0.0})
    assert len(opt.param_groups) == 1  # a refused group leaves nothing behind
    with pytest.raises(TypeError, match="nn.Module"):
        tiger_param_groups([w])
    emb = nn.Embedding(5, 3, sparse=True)
    opt = Tiger(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


# ----------------------------------------------------------------------------- Transformers integration


def test_transformers_scheduler_and_trainer(tmp_path):
    """Plain Trainer(optimizer_cls_and_kwargs=(Tiger, ...)) with a linear schedule == the same loop by hand."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup

    base = _tiny_lm()
    ids = torch.randint(3, 64, (4, 8), generator=torch.Generator().manual_seed(7))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=0.02,
        lr_scheduler_type="linear",
        warmup_steps=1,
        weight_decay=0.1,
        max_grad_norm=0.0,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
    )
    model = copy.deepcopy(base)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizer_cls_and_kwargs=(Tiger, {"lr": 0.02}))
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, Tiger) and trainer.optimizer.param_groups[0]["micro_step"] == 4

    manual = copy.deepcopy(base)
    decay = [p for n, p in manual.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in manual.named_parameters() if "norm" in n]
    opt = Tiger([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=0.02)
    schedule = get_linear_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=4)
    for _ in range(4):
        manual(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        schedule.step()
        opt.zero_grad()
    for (name, a), b in zip(model.named_parameters(), manual.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)
