"""The C segmenter behind BytePiece's fast encode path, against a direct transcription of the reference's loop.

``naive_segment`` below follows ``bytepiece.faster._tokenize`` step by step (matches ordered by end, then by start;
strict ``>``), in Python floats, so ties and float sums are decided the way the reference decides them.
"""

from __future__ import annotations

import math
import random
import threading
import unicodedata

import numpy as np
import pytest

from hf_su.tokenization import bytepiece as bytepiece_module
from hf_su.tokenization.bytepiece import (
    BytePieceTokenizerFast,
    bytepiece_chunks,
    encode_threads,
    nfc,
    sample_in_threads,
    segment_in_threads,
    split_at_chunk_boundaries,
)

_viterbi = bytepiece_module._viterbi
pytestmark = pytest.mark.skipif(_viterbi is None, reason="the C segmenter hf_su.tokenization._viterbi is not built")

SINGLE_BYTES = [bytes([b]) for b in range(256)]


def naive_segment(chunk: bytes, scores: dict[bytes, float]) -> list[bytes]:
    """The reference's Viterbi over one chunk: all matches ending at e (longest first), then e + 1, ..."""
    best = [0.0] + [-math.inf] * len(chunk)
    route = list(range(len(chunk) + 1))
    longest = max(map(len, scores))
    for e in range(1, len(chunk) + 1):
        for s in range(max(0, e - longest), e):
            piece = chunk[s:e]
            if piece in scores and best[s] + scores[piece] > best[e]:
                best[e], route[e] = best[s] + scores[piece], s
    pieces, e = [], len(chunk)
    while e:
        pieces.append(chunk[route[e] : e])
        e = route[e]
    return pieces[::-1]


def naive_ids(text: str, pieces: list[bytes], scores: list[float], first_id: int = 3) -> list[int]:
    table = dict(zip(pieces, scores))
    ids = {piece: first_id + i for i, piece in enumerate(pieces)}
    return [ids[p] for chunk in bytepiece_chunks(text) for p in naive_segment(chunk, table)]


def random_vocab(rng: random.Random, n_extra: int, alphabet: str, tie_prone: bool) -> tuple[list[bytes], list[float]]:
    """All single bytes plus random multi-byte pieces; with ``tie_prone`` scores come from a few values only, so
    permutations of the same pieces tie exactly and the tie rule decides."""
    extra: set[bytes] = set()
    while len(extra) < n_extra:
        piece = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))).encode()
        if len(piece) > 1:
            extra.add(piece)
    pieces = SINGLE_BYTES + sorted(extra)
    if tie_prone:
        scores = [-float(rng.choice([2, 3, 5])) for _ in pieces]
    else:
        scores = [math.log(rng.randint(1, 1000)) - math.log(5000) for _ in pieces]
    order = list(range(len(pieces)))
    rng.shuffle(order)  # ids need not follow any order for the segmenter
    return [pieces[i] for i in order], [scores[i] for i in order]


def random_texts(rng: random.Random, alphabet: str, n: int) -> list[str]:
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(n)]


@pytest.mark.parametrize("tie_prone", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_segmenter_equals_reference_loop(seed, tie_prone):
    rng = random.Random(seed)
    alphabet = "ab}}= \n中文é\u0301😀"
    pieces, scores = random_vocab(rng, 300, alphabet, tie_prone)
    segmenter = _viterbi.Segmenter(pieces, scores, 3)
    texts = random_texts(rng, alphabet + "xyz\n\n\r", 200) + ["", "\n", "\n\n\n", "a\n\nb", "}}}}}}"]
    data = [nfc(t).encode() for t in texts]
    assert segmenter.encode(data) == [naive_ids(t, pieces, scores) for t in texts]


def test_segmenter_equals_backend_unigram_on_a_trained_model():
    rng = random.Random(7)
    tok = BytePieceTokenizerFast.from_bytepiece(_tiny_model())
    texts = random_texts(rng, "科学空间 the of and 0123\n", 100)
    assert tok(texts)["input_ids"] == tok._backend_raw_ids(texts)


def _tiny_model() -> dict:
    from hf_su.tokenization.bytepiece import bytepiece_model_dict

    counts = {b: 1 + b[0] % 7 for b in SINGLE_BYTES}
    counts.update({"科学".encode(): 50, "空间".encode(): 40, b"the": 80, b" the": 60, b"of": 30, b"and ": 20, b"01": 9})
    return bytepiece_model_dict(counts)


def test_threads_give_the_same_ids(monkeypatch):
    monkeypatch.setattr(bytepiece_module, "_PARALLEL_MIN_BYTES", 1)
    rng = random.Random(1)
    alphabet = "abc 中\n"
    pieces, scores = random_vocab(rng, 200, alphabet, tie_prone=True)
    segmenter = _viterbi.Segmenter(pieces, scores, 3)
    texts = random_texts(rng, alphabet, 50)
    long_text = "\n".join(texts) * 3 + "\n\n\nend"  # one text cut into parts across threads
    data = [t.encode() for t in [*texts, long_text, "", "no newline at all " * 30]]
    single = segmenter.encode(data)
    for threads in (2, 3, 8):
        assert segment_in_threads(segmenter, data, threads=threads) == single
    assert segment_in_threads(segmenter, [], threads=2) == []


def test_whole_texts_without_line_chunks(monkeypatch):
    pieces = [*SINGLE_BYTES, b"a\nb", b"\n\n"]
    segmenter = _viterbi.Segmenter(pieces, [-3.0] * 256 + [-1.0, -1.0], 3)
    a_nl_b = 3 + 256
    assert segmenter.encode([b"a\nb"], lines=False) == [[a_nl_b]]
    assert segmenter.encode([b"a\nb"]) == [[3 + ord("a"), 3 + ord("\n"), 3 + ord("b")]]  # "a\n" | "b"
    monkeypatch.setattr(bytepiece_module, "_PARALLEL_MIN_BYTES", 1)
    data = [b"a\nb" * 50, b"xa\nb\n\n"] * 20
    assert segment_in_threads(segmenter, data, threads=2, lines=False) == segmenter.encode(data, lines=False)


def test_threads_run_concurrently_on_one_segmenter():
    pieces, scores = random_vocab(random.Random(2), 100, "ab\n", tie_prone=False)
    segmenter = _viterbi.Segmenter(pieces, scores, 3)
    data = [("ab" * 500 + "\n") * 20] * 4
    expected = segmenter.encode([d.encode() for d in data])
    results: list[list[list[int]]] = []
    workers = [
        threading.Thread(target=lambda: results.append(segmenter.encode([d.encode() for d in data]))) for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert results == [expected] * 4


def test_split_at_chunk_boundaries():
    text = "a\nbb\n\n\nccc\r\n\n" + "中文" * 20 + "\n\n" + "z" * 50
    data = text.encode()
    for size in (1, 2, 5, 17, 1000):
        parts = split_at_chunk_boundaries(data, size)
        assert b"".join(parts) == data
        assert [c for p in parts for c in bytepiece_chunks(p.decode())] == bytepiece_chunks(text)
    assert split_at_chunk_boundaries(b"", 4) == [b""]
    with pytest.raises(ValueError, match="size must be positive"):
        split_at_chunk_boundaries(data, 0)


def test_nfc_of_long_text_in_blocks(monkeypatch):
    monkeypatch.setattr(bytepiece_module, "_NFC_BLOCK", 8)
    # decomposed accents and Hangul jamo (composed by NFC), marks right after a newline, a singleton (Angstrom sign)
    pieces = ["e\u0301", "\u1100\u1161", "\n\u0301x", "\u212b", "abc", "\n", "\u0323\u0307", "\r\n"]
    rng = random.Random(3)
    for _ in range(200):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        assert nfc(text) == unicodedata.normalize("NFC", text)


def test_encode_threads_follows_tokenizers_settings(monkeypatch):
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    assert encode_threads() == 1
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    monkeypatch.setenv("RAYON_NUM_THREADS", "3")
    assert encode_threads() == 3
    monkeypatch.delenv("RAYON_NUM_THREADS")
    assert encode_threads() >= 1


def test_segmenter_rejects_bad_vocabularies():
    scores = [-1.0] * 256
    no_a = _viterbi.Segmenter([b for b in SINGLE_BYTES if b != b"A"] + [b"AB"], scores)
    assert no_a.encode([b"xABy"]) == [[ord("x") - 1, 255, ord("y") - 1]]  # ids follow the list: "A" is missing
    with pytest.raises(ValueError, match=r"texts\[1\] cannot be segmented: no piece covers byte 0x41 at offset 5"):
        no_a.encode([b"AB", b"AB\nxyA"])
    with pytest.raises(ValueError, match="same bytes"):
        _viterbi.Segmenter([*SINGLE_BYTES, b"ab", b"ab"], scores + [-1.0, -2.0])
    with pytest.raises(ValueError, match="non-empty bytes"):
        _viterbi.Segmenter([*SINGLE_BYTES, b""], scores + [-1.0])
    with pytest.raises(ValueError, match="non-empty bytes"):
        _viterbi.Segmenter([*SINGLE_BYTES, "ab"], scores + [-1.0])
    with pytest.raises(ValueError, match="257 pieces but 256 scores"):
        _viterbi.Segmenter([*SINGLE_BYTES, b"ab"], scores)
    with pytest.raises(ValueError, match="not finite"):
        _viterbi.Segmenter(SINGLE_BYTES, [-math.inf, *scores[1:]])
    segmenter = _viterbi.Segmenter(SINGLE_BYTES, scores)
    with pytest.raises(TypeError, match=r"texts\[1\] must be bytes, got str"):
        segmenter.encode([b"ok", "not bytes"])
    assert segmenter.encode([b"\x00\xff"]) == [[0, 255]]


def test_datasets_map_in_processes_after_threads(monkeypatch):
    """Forked workers (datasets' num_proc) segment with threads of their own after the parent used threads."""
    import datasets

    monkeypatch.setattr(bytepiece_module, "_PARALLEL_MIN_BYTES", 1)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    monkeypatch.setenv("RAYON_NUM_THREADS", "2")
    tok = BytePieceTokenizerFast.from_bytepiece(_tiny_model())
    texts = random_texts(random.Random(4), "科学空间 the of\n", 40)
    expected = tok(texts)["input_ids"]
    ds = datasets.Dataset.from_dict({"text": texts})
    mapped = ds.map(lambda batch: tok(batch["text"]), batched=True, batch_size=8, num_proc=2)
    assert mapped["input_ids"] == expected == [naive_ids(t, *_pieces_and_scores(tok)) for t in texts]


def _pieces_and_scores(tok: BytePieceTokenizerFast) -> tuple[list[bytes], list[float]]:
    vocab = tok.bytepiece_vocab()
    return list(vocab.pieces), vocab.log_probs.tolist()


def _segmentations(chunk: bytes, ids: dict[bytes, int]) -> list[tuple[int, ...]]:
    if not chunk:
        return [()]
    return [
        (ids[chunk[:k]], *rest)
        for k in range(1, len(chunk) + 1)
        if chunk[:k] in ids
        for rest in _segmentations(chunk[k:], ids)
    ]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0])
def test_sample_follows_the_law_by_enumeration(alpha):
    """P(segmentation) ∝ exp(alpha · Σ scores), each line on its own, vs brute-force enumeration (total variation)."""
    pieces = [*SINGLE_BYTES, b"ab", b"abc", b"bc", b"ca", b"a\n", b"\n\n"]
    scores = [-3.0] * 256 + [-2.0, -2.5, -1.0, -4.0, -1.5, -2.2]
    ids = {p: i for i, p in enumerate(pieces)}
    text = b"abca\n\nbc"
    chunks = [b"abca\n\n", b"bc"]
    outcomes = [a + b for a in _segmentations(chunks[0], ids) for b in _segmentations(chunks[1], ids)]
    weights = np.array([alpha * sum(scores[i] for i in o) for o in outcomes])
    law = np.exp(weights - weights.max())
    law /= law.sum()
    n = 40_000
    samples = _viterbi.Segmenter(pieces, scores, 0).sample([text] * n, alpha, list(range(n)))
    counts = {o: 0 for o in outcomes}
    for sample in samples:
        counts[tuple(sample)] += 1  # a KeyError here: not a segmentation of the text
    observed = np.array([counts[o] for o in outcomes]) / n
    assert 0.5 * np.abs(observed - law).sum() < 0.015
    assert len(outcomes) > 20


def test_sample_with_large_alpha_is_the_best_path():
    pieces, scores = random_vocab(random.Random(5), 300, "ab}= 中", tie_prone=False)
    segmenter = _viterbi.Segmenter(pieces, scores, 3)
    data = [t.encode() for t in random_texts(random.Random(6), "ab}= 中\n", 50)]
    sampled, best = segmenter.sample(data, 1e4, list(range(len(data)))), segmenter.encode(data)
    assert sampled != best  # exact ties (permutations of the same pieces) are split at random, not longest-first
    # distinct path scores differ by far more than 1/alpha, so every sample is a best path
    for ids, best_ids in zip(sampled, best):
        assert math.isclose(sum(scores[i - 3] for i in ids), sum(scores[i - 3] for i in best_ids), abs_tol=1e-9)


def test_sampling_depends_on_the_seeds_only(monkeypatch):
    monkeypatch.setattr(bytepiece_module, "_PARALLEL_MIN_BYTES", 1)
    monkeypatch.setattr(bytepiece_module, "_SAMPLE_ITEM_BYTES", 64)
    pieces, scores = random_vocab(random.Random(7), 200, "abc 中\n", tie_prone=True)
    segmenter = _viterbi.Segmenter(pieces, scores, 3)
    texts = random_texts(random.Random(8), "abc 中\n", 30) + ["ab\nc 中" * 200]
    data = [t.encode() for t in texts]
    runs = [sample_in_threads(segmenter, data, 0.3, np.random.default_rng(9), threads=k) for k in (1, 2, 5)]
    assert runs[0] == runs[1] == runs[2]
    assert runs[0] != sample_in_threads(segmenter, data, 0.3, np.random.default_rng(10), threads=2)
    by_piece = {3 + i: p for i, p in enumerate(pieces)}
    assert [b"".join(by_piece[i] for i in ids) for ids in runs[0]] == data
    assert segmenter.sample(data[:2], 0.3, [1, 2]) == segmenter.sample(data[:2], 0.3, [1, 2])


def test_sample_errors():
    segmenter = _viterbi.Segmenter(SINGLE_BYTES, [-1.0] * 256)
    for alpha in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="alpha must be finite and >= 0"):
            segmenter.sample([b"ab"], alpha, [0])
    with pytest.raises(ValueError, match="got 2 texts but 1 seeds"):
        segmenter.sample([b"ab", b"c"], 0.1, [0])
    with pytest.raises(TypeError, match=r"seeds\[0\] must be an int"):
        segmenter.sample([b"ab"], 0.1, [0.5])
    assert segmenter.sample([b"ab"], alpha=0.0, seeds=[2**64 - 1]) == [[97, 98]]


def test_long_and_deeply_branching_pieces():
    """The trie builder's recursion stays shallow: pieces a^k b for k < 3000 and one piece of 20,000 bytes."""
    pieces = [*SINGLE_BYTES, *(b"a" * k + b"b" for k in range(1, 3000)), b"x" * 20_000]
    segmenter = _viterbi.Segmenter(pieces, [-1.0] * len(pieces), 0)
    texts = [b"a" * 2999 + b"b", b"a" * 5 + b"b", b"x" * 20_001]
    # the tie on the last text goes to the earliest start: "x" then the long piece, as in the reference
    assert segmenter.encode(texts) == [[256 + 2998], [256 + 4], [ord("x"), len(pieces) - 1]]
    assert segmenter.encode([b"aaab" * 3]) == [naive_ids_bytes(b"aaab" * 3, pieces)]


def naive_ids_bytes(chunk: bytes, pieces: list[bytes]) -> list[int]:
    ids = {p: i for i, p in enumerate(pieces)}
    return [ids[p] for p in naive_segment(chunk, dict.fromkeys(pieces, -1.0))]
