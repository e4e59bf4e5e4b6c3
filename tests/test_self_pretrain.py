"""Self-pretraining: the collator's corruption law, the ListOps generator, pooling, and a tiny end-to-end recipe."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig, ModernBertConfig

from hf_su.tasks.listops import SYMBOLS, generate_listops, listops_dataset, listops_tokenizer
from hf_su.trainer.self_pretrain import (
    PooledSequenceClassifier,
    SelfPretrainingCollator,
    pool_hidden_states,
    self_pretrain_and_finetune,
)

PAD, UNK, MASK, CLS = 0, 1, 2, 3


def evaluate_listops(text: str) -> tuple[int, int]:
    """Independent evaluator: an explicit operand stack (the generator recurses); returns (value, depth)."""
    ops = {"MAX": max, "MIN": min, "SM": lambda v: sum(v) % 10}
    stack: list[tuple[str, list[int], int]] = []  # (operator, operand values, max child depth)
    result = None
    for token in text.split():
        if token.startswith("["):
            stack.append((token[1:], [], 0))
            continue
        if token == "]":
            op, values, child_depth = stack.pop()
            if op == "MED":
                ordered = sorted(values)
                mid = len(ordered) // 2
                value = ordered[mid] if len(ordered) % 2 else math.floor((ordered[mid - 1] + ordered[mid]) / 2)
            else:
                value = ops[op](values)
            value_depth = (value, child_depth + 1)
        else:
            value_depth = (int(token), 0)
        if not stack:
            result = value_depth
        else:
            op, values, depth = stack[-1]
            values.append(value_depth[0])
            stack[-1] = (op, values, max(depth, value_depth[1]))
    assert not stack and result is not None, "unbalanced expression"
    return result


def test_listops_generator_labels_and_bounds():
    examples = generate_listops(300, min_length=20, max_length=80, max_depth=4, max_args=4, seed=1)
    assert len(examples) == 300
    for ex in examples:
        value, depth = evaluate_listops(ex.text)
        assert value == ex.label and depth == ex.depth
        assert 20 <= ex.length <= 80 and 1 <= ex.depth <= 4
        assert set(ex.text.split()) <= set(SYMBOLS)
        assert max(ex.text.count(op) for op in ("[MAX", "[MIN", "[MED", "[SM")) >= 1
    assert len({ex.label for ex in examples}) == 10  # every class occurs
    assert examples == generate_listops(300, min_length=20, max_length=80, max_depth=4, max_args=4, seed=1)
    assert examples != generate_listops(300, min_length=20, max_length=80, max_depth=4, max_args=4, seed=2)


def test_listops_generator_errors():
    with pytest.raises(ValueError, match="min_length <= max_length"):
        generate_listops(1, min_length=50, max_length=10)
    with pytest.raises(ValueError, match="widen the bounds"):
        generate_listops(5, min_length=200, max_length=210, max_depth=1, max_args=2, max_tries=50)


def test_listops_tokenizer_and_dataset():
    tok = listops_tokenizer()
    assert (tok.pad_token_id, tok.unk_token_id, tok.mask_token_id, tok.cls_token_id) == (PAD, UNK, MASK, CLS)
    examples = generate_listops(4, min_length=5, max_length=30, seed=0)
    ds = listops_dataset(examples, tok)
    assert ds["label"] == [e.label for e in examples]
    assert [len(ids) for ids in ds["input_ids"]] == [e.length for e in examples]
    assert tok.decode(ds["input_ids"][0]) == examples[0].text


def _features(lengths, vocab=20, special=(CLS,)):
    gen = torch.Generator().manual_seed(0)
    feats = []
    for n in lengths:
        ids = torch.randint(4, vocab, (n,), generator=gen).tolist()
        ids[0] = special[0]  # a special token at the start of each sequence, as a [CLS] would be
        feats.append({"input_ids": ids, "label": 3})
    return feats


def test_masked_collator_masks_the_requested_fraction_and_never_specials_or_pads():
    collator = SelfPretrainingCollator(
        pad_token_id=PAD, mask_token_id=MASK, mask_ratio=0.15, vocab_size=20, special_token_ids=[CLS, UNK], seed=0
    )
    lengths = [50, 17, 33, 64]
    originals = _features(lengths)
    chosen_total, maskable_total = 0, 0
    replaced = kept = randomised = 0
    for _ in range(200):
        batch = collator(originals)
        ids, labels, attn = batch["input_ids"], batch["labels"], batch["attention_mask"]
        assert ids.shape == (4, 64) and attn.sum(1).tolist() == lengths
        chosen = labels != -100
        for row, n in enumerate(lengths):
            original = torch.tensor(originals[row]["input_ids"])
            k = int(chosen[row].sum())
            assert abs(k - 0.15 * (n - 1)) < 1  # per sequence, within one of the exact fraction
            assert not chosen[row, n:].any() and (ids[row, n:] == PAD).all()  # padding untouched, unlabelled
            assert not chosen[row, 0] and ids[row, 0] == CLS  # special token untouched
            assert (labels[row, :n][chosen[row, :n]] == original[chosen[row, :n]]).all()
            assert (ids[row, :n][~chosen[row, :n]] == original[~chosen[row, :n]]).all()
            sel_ids, sel_orig = ids[row, :n][chosen[row, :n]], original[chosen[row, :n]]
            replaced += int((sel_ids == MASK).sum())
            kept += int((sel_ids == sel_orig).sum())
            randomised += int(((sel_ids != MASK) & (sel_ids != sel_orig)).sum())
            assert not torch.isin(sel_ids[sel_ids != MASK], torch.tensor([PAD, CLS, UNK])).any()
            chosen_total += k
            maskable_total += n - 1
    # over many batches the fraction is exact up to sampling error (k is stochastically rounded)
    assert abs(chosen_total / maskable_total - 0.15) < 0.005
    total = replaced + kept + randomised
    assert abs(replaced / total - 0.8) < 0.03
    # a random replacement equals the original with probability 1/16, so "kept" is 10% + 10%/16
    assert abs(kept / total - (0.1 + 0.1 / 16)) < 0.03


def test_collator_seeding_and_causal_mode():
    feats = _features([30, 12])
    make = lambda seed: SelfPretrainingCollator(  # noqa: E731
        pad_token_id=PAD, mask_token_id=MASK, vocab_size=20, mask_ratio=0.3, seed=seed
    )
    a, b, c = make(1)(feats), make(1)(feats), make(2)(feats)
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(a["labels"], c["labels"])
    causal = SelfPretrainingCollator(pad_token_id=PAD, objective="causal")(feats)
    expected = causal["input_ids"].masked_fill(causal["attention_mask"] == 0, -100)
    assert torch.equal(causal["labels"], expected)
    assert causal["input_ids"][0].tolist() == feats[0]["input_ids"]


def test_collator_errors():
    with pytest.raises(ValueError, match="mask_token_id"):
        SelfPretrainingCollator(pad_token_id=0)
    with pytest.raises(ValueError, match="mask_ratio"):
        SelfPretrainingCollator(pad_token_id=0, mask_token_id=2, mask_ratio=1.5)
    with pytest.raises(ValueError, match="objective"):
        SelfPretrainingCollator(pad_token_id=0, objective="mlm")
    with pytest.raises(ValueError, match="non-empty input_ids"):
        SelfPretrainingCollator(pad_token_id=0, objective="causal")([{"input_ids": []}])


def test_pooling_against_explicit_loops():
    hidden = torch.randn(3, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    for row in range(3):
        valid = hidden[row][mask[row].bool()]
        torch.testing.assert_close(pool_hidden_states(hidden, mask, "mean")[row], valid.mean(0))
        torch.testing.assert_close(pool_hidden_states(hidden, mask, "max")[row], valid.max(0).values)
        torch.testing.assert_close(pool_hidden_states(hidden, mask, "last")[row], valid[-1])
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool_hidden_states(hidden, mask, "cls")
    with pytest.raises(ValueError, match="no valid position"):
        pool_hidden_states(hidden, torch.zeros_like(mask), "mean")


def _tiny_backbone(objective, vocab_size):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        pad_token_id=PAD,
    )
    if objective == "masked":
        return ModernBertConfig(
            **common,
            global_attn_every_n_layers=1,
            local_attention=128,
            bos_token_id=CLS,
            eos_token_id=CLS,
            cls_token_id=CLS,
            sep_token_id=CLS,
            mask_token_id=MASK,
        )
    return LlamaConfig(**common, num_key_value_heads=1, bos_token_id=CLS, eos_token_id=CLS)


@pytest.mark.parametrize("objective,pooling", [("masked", "max"), ("causal", "last")])
def test_recipe_end_to_end_tiny(tmp_path, objective, pooling):
    tok = listops_tokenizer()
    train = listops_dataset(generate_listops(48, min_length=8, max_length=40, max_depth=3, seed=0), tok)
    valid = listops_dataset(generate_listops(16, min_length=8, max_length=40, max_depth=3, seed=1), tok)
    common = dict(
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
        learning_rate=3e-3,
    )
    result = self_pretrain_and_finetune(
        _tiny_backbone(objective, len(tok)),
        tok,
        train,
        valid,
        output_dir=str(tmp_path),
        num_labels=10,
        objective=objective,
        pooling=pooling,
        pretrain_args=dict(common, num_train_epochs=3),
        finetune_args=dict(common, num_train_epochs=1),
    )
    # the best self-pretraining checkpoint was picked by validation loss among the saved ones
    assert result.best_pretrain_checkpoint is not None and result.best_pretrain_eval_loss is not None
    assert math.isfinite(result.best_pretrain_eval_loss)
    assert 0.0 <= result.metrics["eval_accuracy"] <= 1.0
    # the fine-tuned model reloads (directly and through the Auto class) with identical outputs
    batch = tok(valid["text"][:4], return_tensors="pt", padding=True)
    reloaded = AutoModelForSequenceClassification.from_pretrained(result.finetuned_dir)
    assert isinstance(reloaded, PooledSequenceClassifier) and reloaded.config.pooling == pooling
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**batch).logits, result.model.eval()(**batch).logits)


def test_from_self_pretrained_copies_the_body():
    from transformers import AutoModelForMaskedLM

    lm = AutoModelForMaskedLM.from_config(_tiny_backbone("masked", 20))
    clf = PooledSequenceClassifier.from_self_pretrained(lm, num_labels=3, pooling="mean")
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(clf.backbone.state_dict()[name], tensor), name
    assert clf.classifier.out_features == 3
