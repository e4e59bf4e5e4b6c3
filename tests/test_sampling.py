"""Exact Viterbi sampling: the sampled law against brute-force enumeration, determinism, errors, and the collator."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from functools import cache

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from hf_su.testing import shared_data_path
from hf_su.tokenization.bytepiece import BytePieceTokenizerFast, bytepiece_model_dict
from hf_su.tokenization.sampling import encode_sampled, viterbi_sample

BYTEPIECE_MODEL = shared_data_path("bytepiece.plus.40k.model")
CORPORA = [shared_data_path(name) for name in ("kexue_zh.txt", "kexue_en.txt")]
SAMPLES = 20_000
TV_TOLERANCE = 0.02  # expected total variation at 20k samples over <= 40 outcomes is about 0.01


def bytepiece_tokenizer(counts: dict[bytes, int]) -> PreTrainedTokenizerFast:
    """A BytePiece model of these piece counts (plus every single byte) as hf_su's BytePiece adapter."""
    return BytePieceTokenizerFast.from_bytepiece(bytepiece_model_dict({bytes([b]): 1 for b in range(256)} | counts))


def sentencepiece_tokenizer(*, byte_fallback: bool = False, eos: bool = False) -> PreTrainedTokenizerFast:
    """A SentencePiece-style Unigram tokenizer (Metaspace, <unk>, optional byte fallback and T5-like </s>)."""
    pieces = {"▁": -2.0, "a": -2.5, "b": -2.7, "c": -3.1, "ab": -3.0, "ba": -3.6, "abc": -4.4, "bab": -4.9}
    pieces |= {"▁a": -3.3, "▁ab": -3.9, "▁aba": -5.2, "ca": -4.1, "▁c": -3.5}
    vocab = [("<unk>", 0.0), ("</s>", 0.0), *pieces.items()]
    if byte_fallback:
        vocab += [(f"<0x{b:02X}>", -8.0) for b in range(256)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=byte_fallback))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    if eos:
        backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", pad_token="</s>")


TOY_BYTEPIECE = {"天".encode(): 60, "气".encode(): 40, "好".encode(): 70, "天气".encode(): 30}
TOY_BYTEPIECE |= {"气好".encode(): 9, "天".encode()[:2]: 5, b"ab": 20, b" a": 30}


@cache
def _toy_bytepiece() -> PreTrainedTokenizerFast:
    return bytepiece_tokenizer(TOY_BYTEPIECE)


@cache
def _shared_bytepiece() -> PreTrainedTokenizerFast:
    return BytePieceTokenizerFast.from_bytepiece(BYTEPIECE_MODEL)


def _segmentations(word: str, vocab: dict[str, int]) -> list[tuple[int, ...]]:
    """Every way to write ``word`` as a concatenation of vocabulary pieces (brute force)."""
    if not word:
        return [()]
    out = []
    for k in range(1, len(word) + 1):
        if word[:k] in vocab:
            out += [(vocab[word[:k]], *rest) for rest in _segmentations(word[k:], vocab)]
    return out


def _exact_law(tokenizer: PreTrainedTokenizerFast, text: str, alpha: float) -> dict[tuple[int, ...], float]:
    """P(s) ∝ exp(alpha · Σ score) over all segmentations s of the text (words segmented independently)."""
    backend = tokenizer.backend_tokenizer
    words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))]
    model = json.loads(backend.to_str())["model"]
    special = set(backend.get_added_tokens_decoder())
    vocab = {piece: i for i, (piece, _) in enumerate(model["vocab"]) if i not in special}
    scores = [score for _, score in model["vocab"]]
    segs = [sum(parts, ()) for parts in itertools.product(*(_segmentations(w, vocab) for w in words))]
    logw = np.array([alpha * sum(scores[i] for i in seg) for seg in segs], dtype=np.float64)
    prob = np.exp(logw - logw.max())
    return dict(zip(segs, prob / prob.sum()))


def _chi2_critical(dof: int, z: float = 3.09) -> float:
    """Wilson-Hilferty upper quantile of chi-square (z = 3.09: p = 0.001)."""
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * math.sqrt(c)) ** 3


CASES = [
    pytest.param(_toy_bytepiece, "天气好", id="bytepiece"),
    pytest.param(_toy_bytepiece, "天\n气好", id="bytepiece-2-lines"),
    pytest.param(lambda: sentencepiece_tokenizer(), "ababca", id="sentencepiece"),
    pytest.param(lambda: sentencepiece_tokenizer(), "ab bab", id="sentencepiece-2-words"),
]


@pytest.mark.parametrize("alpha", [0.0, 0.1, 1.0])
@pytest.mark.parametrize(("make", "text"), CASES)
def test_sampled_law_matches_enumeration(make, text, alpha, bytepiece_segmenter):
    tokenizer = make()
    law = _exact_law(tokenizer, text, alpha)
    assert 8 <= len(law) <= 40
    samples = encode_sampled(tokenizer, [text] * SAMPLES, alpha=alpha, seed=1234)
    counts = Counter(map(tuple, samples))
    assert set(counts) <= set(law), "sampled a sequence that is not a segmentation of the text"
    observed = np.array([counts[s] for s in law], dtype=np.float64) / SAMPLES
    expected = np.array(list(law.values()))
    tv = 0.5 * np.abs(observed - expected).sum()
    assert tv < TV_TOLERANCE
    # Pearson chi-square over outcomes with expected count >= 5 (the rest pooled)
    big = expected * SAMPLES >= 5
    obs = np.append(observed[big], observed[~big].sum()) * SAMPLES
    exp = np.append(expected[big], expected[~big].sum()) * SAMPLES
    keep = exp > 0
    chi2 = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    assert chi2 < _chi2_critical(int(keep.sum()) - 1)
    # the test can tell the laws apart: the law at a distant alpha differs by far more than the tolerance
    other = np.array(list(_exact_law(tokenizer, text, 1.0 if alpha < 0.5 else 0.0).values()))
    assert 0.5 * np.abs(other - expected).sum() > 5 * TV_TOLERANCE


@pytest.mark.parametrize(("make", "text"), CASES)
def test_negative_alpha_is_deterministic_encode(make, text, bytepiece_segmenter):
    tokenizer = make()
    texts = [text, text + " " + text[::-1], "", "a\n\nb c"]
    assert encode_sampled(tokenizer, texts, alpha=-1) == [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def test_large_alpha_recovers_viterbi_including_unknown_and_byte_fallback():
    texts = ["ababca abc", "xy ab zz ca", "é abé", "cabbage  a"]
    for tokenizer in (sentencepiece_tokenizer(), sentencepiece_tokenizer(byte_fallback=True)):
        for text in texts:
            # scores differ by >= 0.1 between competing paths here, so alpha = 400 leaves < e^-40 to others
            assert viterbi_sample(tokenizer, text, alpha=400.0, generator=0) == tokenizer.encode(
                text, add_special_tokens=False
            )


@pytest.mark.parametrize("byte_fallback", [False, True])
def test_decode_roundtrip_with_unknown_characters(byte_fallback):
    tokenizer = sentencepiece_tokenizer(byte_fallback=byte_fallback)
    texts = ["abé xyz cab", "ééa b", "c"]
    rng = np.random.default_rng(0)
    for alpha in (0.0, 0.5):
        for _ in range(20):
            for ids, text in zip(encode_sampled(tokenizer, texts, alpha=alpha, seed=rng), texts):
                assert tokenizer.decode(ids) == tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
    if byte_fallback:
        assert tokenizer.convert_tokens_to_ids(["<0xC3>", "<0xA9>"]) == viterbi_sample(tokenizer, "é", generator=0)[1:]
    else:  # consecutive unknown characters fuse into one <unk>, as tokenizers' Unigram does
        assert viterbi_sample(tokenizer, "xyz", alpha=0.0, generator=0) == tokenizer.encode("xyz")


def test_added_and_special_tokens():
    tokenizer = sentencepiece_tokenizer(eos=True)
    eos = tokenizer.eos_token_id
    text = "abab</s>ca abc"
    for seed in range(10):
        ids = viterbi_sample(tokenizer, text, alpha=0.0, generator=seed)
        assert ids.count(eos) == 1
        assert tokenizer.decode(ids) == tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
        with_specials = viterbi_sample(tokenizer, "ab ca", alpha=0.0, generator=seed, add_special_tokens=True)
        assert with_specials[-1] == eos and tokenizer.decode(with_specials) == tokenizer.decode(
            tokenizer.encode("ab ca")
        )
    assert encode_sampled(tokenizer, [text], alpha=-1, add_special_tokens=True) == [tokenizer.encode(text)]
    fallback = sentencepiece_tokenizer(byte_fallback=True, eos=True)
    for text in ("é</s>abé xé", "zz</s></s>"):
        ids = viterbi_sample(fallback, text, alpha=0.0, generator=1)
        assert fallback.decode(ids) == fallback.decode(fallback.encode(text, add_special_tokens=False))
    # BytePieceTokenizerFast encodes literal special-token text as plain bytes (as the reference does), and the
    # sampler follows the tokenizer's own splitting
    bytepiece = _toy_bytepiece()
    text = "天气好<eos> ab天气"
    assert bytepiece.eos_token_id not in bytepiece.encode(text)
    for seed in range(5):
        ids = viterbi_sample(bytepiece, text, alpha=0.0, generator=seed)
        assert bytepiece.eos_token_id not in ids and bytepiece.decode(ids) == text


def test_seeded_runs_reproduce_and_seeds_differ(bytepiece_segmenter):
    tokenizer = _toy_bytepiece()
    texts = ["天气好 ab ab 天气好天气好"] * 8
    first = encode_sampled(tokenizer, texts, alpha=0.1, seed=7)
    assert first == encode_sampled(tokenizer, texts, alpha=0.1, seed=7)
    assert first != encode_sampled(tokenizer, texts, alpha=0.1, seed=8)
    assert len({tuple(ids) for ids in first}) > 1  # texts of one batch are sampled independently
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    assert [viterbi_sample(tokenizer, texts[0], generator=rng_a) for _ in range(3)] == [
        viterbi_sample(tokenizer, texts[0], generator=rng_b) for _ in range(3)
    ]


def test_errors():
    tokenizer = _toy_bytepiece()
    for alpha in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="alpha"):
            viterbi_sample(tokenizer, "ab", alpha=alpha)
    with pytest.raises(TypeError, match="alpha"):
        viterbi_sample(tokenizer, "ab", alpha="0.1")
    with pytest.raises(TypeError, match="text"):
        viterbi_sample(tokenizer, b"ab")
    for alpha in (0.1, -1.0):
        with pytest.raises(TypeError, match="texts must be str"):
            encode_sampled(tokenizer, ["ab", 3], alpha=alpha)
    with pytest.raises(TypeError, match="generator"):
        viterbi_sample(tokenizer, "ab", generator=np.random.RandomState(0))
    with pytest.raises(TypeError, match="fast tokenizer"):
        viterbi_sample(object(), "ab")
    bpe = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    with pytest.raises(ValueError, match="Unigram"):
        viterbi_sample(PreTrainedTokenizerFast(tokenizer_object=bpe), "ab")
    with pytest.raises(ValueError, match="Unigram"):
        from hf_su.tokenization import SubwordRegularization

        SubwordRegularization(PreTrainedTokenizerFast(tokenizer_object=bpe))
    no_unk = Tokenizer(models.Unigram([("a", -1.0), ("b", -1.0)], unk_id=None))
    with pytest.raises(ValueError, match="no vocabulary piece"):
        viterbi_sample(no_unk, "abz")


@pytest.mark.skipif(BYTEPIECE_MODEL is None, reason="shared BytePiece model not available")
@pytest.mark.parametrize("path", CORPORA, ids=["zh", "en"])
def test_shared_corpora(path, bytepiece_segmenter):
    if path is None:
        pytest.skip(f"{path} not available")
    tokenizer = _shared_bytepiece()
    with open(path, encoding="utf-8") as f:
        lines = f.read(60_000).splitlines(keepends=True)
    deterministic = [enc.ids for enc in tokenizer.backend_tokenizer.encode_batch(lines, add_special_tokens=False)]
    assert encode_sampled(tokenizer, lines, alpha=-1) == deterministic
    for alpha in (0.0, 0.1):
        sampled = encode_sampled(tokenizer, lines, alpha=alpha, seed=0)
        assert tokenizer.batch_decode(sampled) == tokenizer.batch_decode(deterministic)
        assert sampled != deterministic


TEXTS = ["天气好 ab 天气好天气好 ab", "ab ab 天气 好", "好天气 ab ab", "天气好天气好 ab ab ab"]


def _transformed_dataset(**kwargs):
    from datasets import Dataset

    from hf_su.tokenization import SubwordRegularization

    dataset = Dataset.from_dict({"text": TEXTS, "label": [0, 1, 2, 3]})
    dataset.set_transform(SubwordRegularization(_toy_bytepiece(), **kwargs))
    return dataset


def test_transform_resamples_on_every_read_and_reproduces():
    tokenizer = _toy_bytepiece()
    dataset = _transformed_dataset(alpha=0.0, seed=5, add_special_tokens=True)
    reads = [dataset[:] for _ in range(6)]
    for read in reads:
        assert read["label"] == [0, 1, 2, 3] and "text" not in read
        for ids, mask, text in zip(read["input_ids"], read["attention_mask"], TEXTS):
            assert len(mask) == len(ids)
            assert tokenizer.decode(ids) == text
    assert len({tuple(read["input_ids"][0]) for read in reads}) > 1  # fresh segmentations on each access
    again = _transformed_dataset(alpha=0.0, seed=5, add_special_tokens=True)
    assert [again[:] for _ in range(6)] == reads
    assert _transformed_dataset(alpha=0.0, seed=6)[:]["input_ids"] != reads[0]["input_ids"]
    truncated = _transformed_dataset(alpha=0.0, seed=5, max_length=3)[:]["input_ids"]
    assert all(len(ids) <= 3 for ids in truncated)
    from hf_su.tokenization import SubwordRegularization

    single = SubwordRegularization(tokenizer, alpha=-1)({"text": TEXTS[0], "label": 0})
    assert single == {
        "label": 0,
        "input_ids": tokenizer.encode(TEXTS[0]),
        "attention_mask": [1] * len(single["input_ids"]),
    }


def test_dataloader_workers_differ_and_reproduce():
    import torch
    from torch.utils.data import DataLoader

    def run() -> list[list[list[int]]]:
        torch.manual_seed(0)  # Trainer seeds torch; worker seeds derive from it
        dataset = _transformed_dataset(alpha=0.0, seed=11)
        loader = DataLoader([0] * 4, batch_size=1, num_workers=2, collate_fn=lambda idx: dataset[0]["input_ids"])
        return [list(loader) for _epoch in range(2)]  # worker 0 reads batches 0 and 2, worker 1 batches 1 and 3

    first = run()
    assert first == run()
    epoch1, epoch2 = first
    assert epoch1[0] != epoch1[1]  # same example, same step, different workers: different streams
    assert epoch1 != epoch2  # fresh worker processes each epoch still draw new segmentations


def test_collator_with_trainer(tmp_path):
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from hf_su.testing import tiny_causal_lm
    from hf_su.tokenization import SubwordRegularization

    tokenizer = _toy_bytepiece()
    collator = SubwordRegularization(
        tokenizer, alpha=0.1, seed=0, collator=DataCollatorForLanguageModeling(tokenizer, mlm=False)
    )
    batch = collator([{"text": t} for t in TEXTS])
    assert batch["input_ids"].shape == batch["labels"].shape and batch["input_ids"].shape[0] == 4
    with pytest.raises(KeyError, match="remove_unused_columns"):
        collator([{"input_ids": [1]}])
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        remove_unused_columns=False,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}), data_collator=collator)
    result = trainer.train()
    assert math.isfinite(result.training_loss)


def test_raw_backend_and_text_without_any_known_character():
    backend = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0), ("ab", -2.5)], unk_id=0))
    backend.decoder = decoders.Fuse()
    for text in ("zzz", "", "azzb", "abab"):
        for alpha in (-1.0, 0.0, 1.0):
            ids = viterbi_sample(backend, text, alpha=alpha, generator=0)
            assert backend.decode(ids) == backend.decode(backend.encode(text).ids)
    assert viterbi_sample(backend, "zzz", alpha=0.0, generator=0) == [0]  # one fused <unk>
    assert encode_sampled(backend, [], alpha=0.1) == []


def test_lattice_has_exactly_the_vocabulary_matches_on_a_large_alphabet():
    """The vectorised trie (double array) finds every piece occurrence and nothing else."""
    from hf_su.tokenization.sampling import _compiled

    rng = np.random.default_rng(0)
    alphabet = [chr(0x4E00 + i) for i in rng.choice(20_000, size=400, replace=False)] + list("abc▁")
    pieces = {"".join(rng.choice(alphabet, size=rng.integers(1, 6))) for _ in range(6000)} | set(alphabet[:300])
    vocab = [("<unk>", 0.0), *((p, -float(rng.uniform(1, 12))) for p in sorted(pieces))]
    backend = Tokenizer(models.Unigram(vocab, unk_id=0))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    ids = {piece: i for i, (piece, _) in enumerate(vocab)}
    words = ["".join(rng.choice(alphabet, size=rng.integers(1, 30))) for _ in range(300)]
    lattice, bounds = _compiled(backend).lattice(words)
    offsets = dict(zip(range(len(words)), bounds.tolist()))
    expected = {
        (offsets[w] + i, k, ids[word[i : i + k]])
        for w, word in enumerate(words)
        for i in range(len(word))
        for k in range(1, 6)
        if i + k <= len(word) and word[i : i + k] in ids
    }
    found = set(zip(lattice.start.tolist(), lattice.length.tolist(), lattice.piece.tolist()))
    unknown = {edge for edge in found if edge[2] == -1}
    assert found - unknown == expected
    assert unknown == {(p, 1, -1) for p, ch in enumerate("".join(words)) if ch not in ids}  # <unk> edges
    assert unknown and len(expected) > 3 * len(words)


def test_texts_larger_than_a_block_are_sampled_in_pieces(monkeypatch):
    from hf_su.tokenization import sampling

    monkeypatch.setattr(sampling, "_BLOCK_CHARS", 16)
    tokenizer = sentencepiece_tokenizer(eos=True)
    texts = ["ab " * 40 + "cab", "ba", "abc abc " * 9]
    for alpha in (0.0, 1.0):
        sampled = encode_sampled(tokenizer, texts, alpha=alpha, seed=3, add_special_tokens=True)
        assert sampled == encode_sampled(tokenizer, texts, alpha=alpha, seed=3, add_special_tokens=True)
        assert [tokenizer.decode(ids) for ids in sampled] == [tokenizer.decode(tokenizer.encode(t)) for t in texts]
        assert all(ids.count(tokenizer.eos_token_id) == 1 and ids[-1] == tokenizer.eos_token_id for ids in sampled)


def test_bytepiece_special_tokens_around_samples(bytepiece_segmenter):
    tokenizer = BytePieceTokenizerFast.from_bytepiece(
        bytepiece_model_dict({bytes([b]): 1 for b in range(256)} | TOY_BYTEPIECE),
        add_bos_token=True,
        add_eos_token=True,
    )
    for ids in encode_sampled(tokenizer, ["天气好 ab", ""], alpha=0.1, seed=0, add_special_tokens=True):
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    from hf_su.tokenization import SubwordRegularization

    ids = SubwordRegularization(tokenizer, alpha=0.1, seed=0).encode(["天气好"])[0]
    assert (ids[0], ids[-1]) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
