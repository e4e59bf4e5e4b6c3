"""EMOTrainer end to end on tiny models: the training loss is the EMO loss of the model's own logits, gradient
accumulation equals one large batch, evaluation stays plain cross-entropy, training lowers eval CE, resume is exact."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainingArguments, default_data_collator

from hf_su.testing import run_torchrun, tiny_causal_lm
from hf_su.trainer.emo import emo_loss
from hf_su.trainer.trainer import COST_EMBEDDING_FILE, EMOTrainer, load_cost_embedding

SEQ = 12


def _args(tmp_path, **overrides) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        dataloader_drop_last=True,
        seed=0,
    )
    return TrainingArguments(**{**base, **overrides})


def _examples(n: int, vocab: int = 512, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Fixed-length rows with right padding of different lengths (so micro-batches hold different token counts)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = SEQ - (i * 5) % (SEQ - 2)
        ids = torch.randint(3, vocab, (SEQ,), generator=gen)
        mask = (torch.arange(SEQ) < length).long()
        labels = torch.where(mask.bool(), ids, -100)
        rows.append({"input_ids": ids * mask, "attention_mask": mask, "labels": labels})
    return rows


def _batch(rows):
    return default_data_collator(rows)


def _reference_loss(model, batch, cost, mode="mix", num_items=None):
    """emo_loss on the model's full logits with HF's label shift: the independent path."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["labels"][:, 1:]
    return emo_loss(out.logits[:, :-1], labels, cost, mode=mode, num_items_in_batch=num_items)


def _param_dict(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "gemma", "phi"])  # untied; tied embeddings; an lm_head bias
@pytest.mark.parametrize("mode", ["mix", "emo2"])
def test_training_loss_and_grads_match_reference(tmp_path, arch, mode):
    model = tiny_causal_lm(arch, dtype=torch.float64).train()
    trainer = EMOTrainer(model=model, args=_args(tmp_path), emo_mode=mode)
    batch = _batch(_examples(4))
    num_items = int((batch["labels"][:, 1:] != -100).sum()) + 3

    loss = trainer.compute_loss(model, batch, num_items_in_batch=num_items)
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    head_weight = model.get_output_embeddings().weight
    ref = _reference_loss(model, batch, head_weight, mode, num_items)
    ref_grads = torch.autograd.grad(ref, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


def test_peft_lora_model(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_causal_lm("llama", dtype=torch.float64)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    # B is zero-initialised by LoRA: make the adapter do something so the comparison means something
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.train()
    trainer = EMOTrainer(model=model, args=_args(tmp_path))
    batch = _batch(_examples(4))
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss = trainer.compute_loss(model, batch)
    grads = torch.autograd.grad(loss, trainable)
    ref = _reference_loss(model, batch, base.get_output_embeddings().weight)
    ref_grads = torch.autograd.grad(ref, trainable)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)

    on_head = peft.get_peft_model(tiny_causal_lm("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="LoRA on lm_head"):
        EMOTrainer(model=on_head, args=_args(tmp_path))


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    """4 micro-batches of 2 and one batch of 8 give the same SGD update, equal to -lr * grad of the reference loss
    over all 8 rows (rows hold different numbers of tokens, so per-micro-batch means would differ)."""
    rows = _examples(8)
    lr = 0.5
    start = tiny_causal_lm("llama", dtype=torch.float64)
    expected_model = tiny_causal_lm("llama", dtype=torch.float64).train()
    ref = _reference_loss(expected_model, _batch(rows), expected_model.get_output_embeddings().weight)
    ref.backward()
    expected = {n: p.detach() - lr * p.grad for n, p in expected_model.named_parameters()}
    ce_before = F.cross_entropy(
        expected_model(input_ids=_batch(rows)["input_ids"], attention_mask=_batch(rows)["attention_mask"])
        .logits[:, :-1]
        .reshape(-1, 512),
        _batch(rows)["labels"][:, 1:].reshape(-1),
    ).item()

    results = {}
    for batch_size, accumulation in [(8, 1), (2, 4)]:
        model = tiny_causal_lm("llama", dtype=torch.float64)
        model.load_state_dict(start.state_dict())
        trainer = EMOTrainer(
            model=model,
            args=_args(
                tmp_path / f"bs{batch_size}",
                per_device_train_batch_size=batch_size,
                gradient_accumulation_steps=accumulation,
                max_steps=1,
            ),
            train_dataset=rows,
            optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": lr}),
        )
        trainer.train()
        results[accumulation] = (_param_dict(model), trainer.state.log_history[0])

    for accumulation, (params, logs) in results.items():
        for name, value in params.items():
            torch.testing.assert_close(value, expected[name], rtol=1e-9, atol=1e-12, msg=f"GA={accumulation} {name}")
        assert logs["loss"] == pytest.approx(ref.item(), rel=1e-6)
        assert logs["ce_loss"] == pytest.approx(ce_before, rel=1e-6)
        assert 0.0 < logs["emo_loss"] < 2.0


def test_evaluation_loss_is_plain_cross_entropy(tmp_path):
    rows = _examples(8, seed=3)
    model = tiny_causal_lm("llama")
    trainer = EMOTrainer(model=model, args=_args(tmp_path), eval_dataset=rows, emo_mode="emo")
    metrics = trainer.evaluate()
    batch = _batch(rows)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 512), batch["labels"][:, 1:].reshape(-1))
    assert metrics["eval_loss"] == pytest.approx(ce.item(), rel=1e-5)


def _corpus_blocks(tokenizer, n_blocks: int, block: int) -> list[dict[str, torch.Tensor]]:
    from hf_su.data import embedded_corpus

    ids = []
    for doc in embedded_corpus("topics", max_chars=100_000):
        ids.extend(tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id])
        if len(ids) >= n_blocks * block:
            break
    rows = []
    for i in range(n_blocks):
        chunk = torch.tensor(ids[i * block : (i + 1) * block])
        rows.append({"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": chunk.clone()})
    return rows


def test_training_on_the_corpus_lowers_eval_cross_entropy(tmp_path, tokenizer):
    rows = _corpus_blocks(tokenizer, 480, 32)
    train, held_out = rows[:448], rows[448:]
    model = tiny_causal_lm("llama", num_hidden_layers=1)
    trainer = EMOTrainer(
        model=model,
        args=_args(tmp_path, max_steps=150, learning_rate=5e-3, logging_steps=50, max_grad_norm=1.0),
        train_dataset=train,
        eval_dataset=held_out,
        emo_mode="mix",
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert before > 6.0  # about ln(512) for a random model
    assert after < before - 1.5, (before, after)
    logged = [log for log in trainer.state.log_history if "ce_loss" in log]
    assert logged[-1]["ce_loss"] < logged[0]["ce_loss"]


def test_fixed_cost_checkpoint_resume_is_exact(tmp_path):
    rows = _examples(24, seed=5)
    common = dict(max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2, save_steps=3, save_strategy="steps")

    full_model = tiny_causal_lm("llama")
    full = EMOTrainer(model=full_model, args=_args(tmp_path / "full", **common), train_dataset=rows, emo_cost="fixed")
    initial_head = full_model.get_output_embeddings().weight.detach().clone()
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert os.path.isfile(checkpoint / COST_EMBEDDING_FILE)
    torch.testing.assert_close(load_cost_embedding(str(checkpoint)), initial_head, rtol=0, atol=0)
    assert not torch.equal(full_model.get_output_embeddings().weight, initial_head)  # the head moved, the cost not

    # A differently initialised model: everything, the fixed cost included, must come from the checkpoint.
    resumed_model = tiny_causal_lm("llama", seed=1)
    resumed = EMOTrainer(
        model=resumed_model, args=_args(tmp_path / "full", **common), train_dataset=rows, emo_cost="fixed"
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    torch.testing.assert_close(resumed._cost_embedding, initial_head, rtol=0, atol=0)
    for (name, p), q in zip(full_model.named_parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def test_given_cost_embedding_and_adaptive_cost(tmp_path):
    model = tiny_causal_lm("llama", dtype=torch.float64).train()
    cost = torch.randn(512, 24, dtype=torch.float64)
    batch = _batch(_examples(4))
    trainer = EMOTrainer(model=model, args=_args(tmp_path), emo_cost=cost, emo_mode="emo2")
    loss = trainer.compute_loss(model, batch)
    torch.testing.assert_close(loss, _reference_loss(model, batch, cost, "emo2"), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="vocab size mismatch"):
        EMOTrainer(model=model, args=_args(tmp_path), emo_cost=torch.randn(500, 24))


def test_all_ignored_batch_gives_zero_loss_and_zero_grads(tmp_path):
    model = tiny_causal_lm("llama").train()
    trainer = EMOTrainer(model=model, args=_args(tmp_path))
    batch = _batch(_examples(2))
    batch["labels"][:] = -100
    for num_items in (None, 0):
        loss = trainer.compute_loss(model, batch, num_items_in_batch=num_items)
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        assert loss.item() == 0.0
        assert all(g is None or (torch.isfinite(g).all() and not g.any()) for g in grads)


def test_tiger_optimizer(tmp_path):
    tiger = pytest.importorskip("hf_su.trainer.tiger")
    model = tiny_causal_lm("llama")
    before = _param_dict(model)
    trainer = EMOTrainer(
        model=model,
        args=_args(tmp_path, max_steps=2, learning_rate=1e-3, weight_decay=0.01, optim_args="beta=0.9, min_rms=0.05"),
        train_dataset=_examples(16),
        optimizer="tiger",
    )
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    assert isinstance(optimizer, tiger.Tiger)
    assert all(group["lr"] == 1e-3 for group in optimizer.param_groups)
    assert all(group["beta"] == 0.9 and group["min_rms"] == 0.05 for group in optimizer.param_groups)  # optim_args
    assert {group["weight_decay"] for group in optimizer.param_groups} == {0.0, 0.01}  # vectors take no decay
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_user_optimizer_is_respected(tmp_path):
    model = tiny_causal_lm("llama")
    trainer = EMOTrainer(
        model=model, args=_args(tmp_path), optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1, "momentum": 0.5})
    )
    assert isinstance(trainer.create_optimizer(), torch.optim.SGD)
    sgd = torch.optim.SGD(model.parameters(), lr=0.2)
    assert EMOTrainer(model=model, args=_args(tmp_path), optimizers=(sgd, None)).create_optimizer() is sgd


def test_clear_errors(tmp_path):
    from transformers import AutoModel

    from hf_su.testing import tiny_config

    model = tiny_causal_lm("llama")
    args = _args(tmp_path)
    with pytest.raises(ValueError, match="unknown emo_mode"):
        EMOTrainer(model=model, args=args, emo_mode="emo3")
    with pytest.raises(ValueError, match="emo_cost"):
        EMOTrainer(model=model, args=args, emo_cost="frozen")
    with pytest.raises(ValueError, match="unknown optimizer"):
        EMOTrainer(model=model, args=args, optimizer="lion")
    with pytest.raises(ValueError, match="conflicts"):
        EMOTrainer(model=model, args=args, optimizer="tiger", optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 1}))
    for bad in ("betas=0.9", "beta", "min_rms=small"):
        with pytest.raises(ValueError, match="optim_args item"):
            EMOTrainer(model=model, args=_args(tmp_path, optim_args=bad), optimizer="tiger")
    with pytest.raises(ValueError, match="compute_loss_func"):
        EMOTrainer(model=model, args=args, compute_loss_func=lambda *a, **k: 0)
    with pytest.raises(ValueError, match="label_smoothing"):
        EMOTrainer(model=model, args=_args(tmp_path, label_smoothing_factor=0.1))
    with pytest.raises(ValueError, match="no output embeddings"):
        EMOTrainer(model=AutoModel.from_config(tiny_config("llama")), args=args)
    with pytest.raises(ValueError, match="call train"):
        EMOTrainer(model=model, args=args, emo_cost="fixed").compute_loss(model.train(), _batch(_examples(2)))
    with pytest.raises(ValueError, match="labels"):
        batch = _batch(_examples(2))
        del batch["labels"]
        EMOTrainer(model=model, args=args).compute_loss(model.train(), batch)


def test_refuses_models_that_transform_their_logits(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gemma2",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=1,
        final_logit_softcapping=5.0,
    )
    model = AutoModelForCausalLM.from_config(config).train()
    trainer = EMOTrainer(model=model, args=_args(tmp_path))
    with pytest.raises(ValueError, match="transforms its logits"):
        trainer.compute_loss(model, _batch(_examples(2)))


_DDP_WORKER = """
import sys, torch
from transformers import TrainingArguments
sys.path.insert(0, {tests_dir!r})
from test_emo_trainer import _args, _examples
from hf_su.testing import tiny_causal_lm
from hf_su.trainer.trainer import EMOTrainer

model = tiny_causal_lm("llama", dtype=torch.float64)
args = _args({out!r}, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1)
trainer = EMOTrainer(model=model, args=args, train_dataset=_examples(8),
                     optimizer_cls_and_kwargs=(torch.optim.SGD, {{"lr": {lr}}}))
trainer.train()
if trainer.args.process_index == 0:
    assert trainer.args.world_size == 2
    torch.save({{"params": dict(model.named_parameters()), "logs": trainer.state.log_history[0]}}, {result!r})
# exiting with the gloo group still up can abort a rank at shutdown ("terminate called without an active exception")
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


@pytest.mark.distributed
def test_ddp_two_processes_equal_one_large_batch(tmp_path):
    """2 ranks × 2 micro-batches × 2 rows (different token counts per rank) give the single-process update of all
    8 rows: the loss is divided by the global token count and scaled back up for DDP's gradient averaging."""
    lr = 0.5
    worker = tmp_path / "worker.py"
    result = tmp_path / "result.pt"
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    worker.write_text(_DDP_WORKER.format(tests_dir=tests_dir, out=str(tmp_path / "out"), lr=lr, result=str(result)))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
    }
    run_torchrun([str(worker)], env=env, timeout=120)

    rows = _examples(8)
    model = tiny_causal_lm("llama", dtype=torch.float64).train()
    ref = _reference_loss(model, _batch(rows), model.get_output_embeddings().weight)
    ref.backward()
    got = torch.load(result)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got["params"][name].detach(), p.detach() - lr * p.grad, rtol=1e-9, atol=1e-12)
    assert got["logs"]["loss"] == pytest.approx(ref.item(), rel=1e-6)
