"""``train_bytepiece``: the BytePiece training algorithm (Su 2023), vectorised and parallel, same result as the reference.

The reference ``bytepiece.Trainer`` does four steps; this module does the same steps with the same arithmetic:

1. count every byte n-gram (n <= ``order``) inside each training chunk -- here with integer-coded n-grams and
   ``np.unique`` per shard of documents, one shard per worker process, merged by sorting;
2. prune n-grams rarer than ``min_count`` and turn counts into conditional log-probabilities;
3. segment every chunk by Viterbi over byte labels ("this byte is the j-th of its piece") and count the pieces --
   here all chunks of a shard advance through the Viterbi recursion together, one position per NumPy step;
4. prune pieces: re-split rare or over-long pieces, drop "wasted" pieces that the Unigram model never outputs, cut to
   the vocabulary size -- here each re-split runs the C segmenter of ``hf_su.tokenization.bytepiece`` on all cores
   (or, when it is not built, one parallel ``encode_batch_fast`` of a ``tokenizers`` Unigram model; both have the
   same scores and the same longest-first tie-breaking as the reference's Aho-Corasick Viterbi).

The n-gram log-probabilities, Viterbi sums and piece scores are computed with the same NumPy float64 operations in
the same order as the reference, so the written model equals ``bytepiece.Trainer``'s for the same settings.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer, models
from tqdm.auto import tqdm

from .bytepiece import (
    NUM_RESERVED,
    _utf8,
    bytes_to_byte_level,
    c_segmenter,
    log_probs,
    segment_in_threads,
    write_bytepiece_model,
)

_MAX_CHUNK_CHARS = 10000  # the reference caps training chunks (and runs of newlines at 100)
_SHARD_CHARS = 1 << 18  # documents are grouped into shards of about this many characters, one task each
_MAX_ORDER = 8  # n-grams are coded as uint64


def _chunk_regex(isolate_digits: bool) -> re.Pattern[str]:
    n = _MAX_CHUNK_CHARS
    if isolate_digits:
        return re.compile(rf"\d|[^\n\d]{{,{n}}}\n{{1,100}}|[^\n\d]{{1,{n}}}")
    return re.compile(rf".{{,{n}}}\n{{1,100}}|.{{1,{n}}}")


def _training_chunks(texts: Sequence[str], isolate_digits: bool) -> tuple[np.ndarray, np.ndarray]:
    """All training chunks of ``texts`` concatenated as one byte array, with each chunk's start (and the total)."""
    regex = _chunk_regex(isolate_digits)
    chunks = [_utf8(c) for text in texts for c in regex.findall(unicodedata.normalize("NFC", text))]
    lengths = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
    starts = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    return np.frombuffer(b"".join(chunks), dtype=np.uint8), starts


def _ngram_codes(buf: np.ndarray, starts: np.ndarray, order: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """For n = 1..order: the uint64 code of the n-gram ending at each position, and whether it lies in one chunk."""
    offset = np.arange(len(buf), dtype=np.int64) - np.repeat(starts[:-1], np.diff(starts))
    codes = buf.astype(np.uint64)
    out = [(codes, np.ones(len(buf), dtype=bool))]
    for n in range(2, order + 1):
        shifted = np.zeros_like(codes)
        shifted[1:] = codes[:-1] << np.uint64(8)
        codes = shifted | buf
        out.append((codes, offset >= n - 1))
    return out


def _count_shard(task: tuple[list[str], bool, int]) -> tuple[int, list[tuple[np.ndarray, np.ndarray]]]:
    texts, isolate_digits, order = task
    buf, starts = _training_chunks(texts, isolate_digits)
    counts = [np.unique(codes[valid], return_counts=True) for codes, valid in _ngram_codes(buf, starts, order)]
    return len(buf), counts


def _merge_counts(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    keys = np.concatenate([k for k, _ in parts])
    counts = np.concatenate([c for _, c in parts]).astype(np.int64)
    unique, inverse = np.unique(keys, return_inverse=True)
    return unique, np.bincount(inverse.ravel(), weights=counts, minlength=len(unique)).astype(np.int64)


def _ngram_log_probs(
    total: int, tables: list[tuple[np.ndarray, np.ndarray]], min_count: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Step 2: ``log c(k) - log c(k[:-1])`` for kept n-grams (``bytepiece.Trainer.prune_ngrams``)."""
    keys1, counts1 = tables[0]
    missing = np.setdiff1d(np.arange(256, dtype=np.uint64), keys1)
    keys1 = np.concatenate([keys1, missing])
    counts1 = np.concatenate([counts1, np.ones(len(missing), dtype=np.int64)])
    order = np.argsort(keys1)
    tables = [(keys1[order], counts1[order]), *tables[1:]]
    total += len(missing)
    kept = [tables[0]] + [(k[c >= min_count], c[c >= min_count]) for k, c in tables[1:]]
    log_counts = [np.log(c) for _, c in kept]
    result = [(kept[0][0], log_counts[0] - np.log(total))]
    for n in range(1, len(kept)):
        keys, prefix_keys = kept[n][0], kept[n - 1][0]
        prefix = np.searchsorted(prefix_keys, keys >> np.uint64(8))
        result.append((keys, log_counts[n] - log_counts[n - 1][prefix]))
    return result


def _lookup(keys: np.ndarray, values: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``values`` of ``codes`` in the sorted ``keys``; -inf where absent (a pruned or unseen n-gram)."""
    if len(keys) == 0:
        return np.full(len(codes), -np.inf)
    idx = np.minimum(np.searchsorted(keys, codes), len(keys) - 1)
    return np.where(keys[idx] == codes, values[idx], -np.inf)


_TABLES: list[tuple[np.ndarray, np.ndarray]] = []


def _set_tables(tables: list[tuple[np.ndarray, np.ndarray]]) -> None:
    global _TABLES
    _TABLES = tables


def _segment_shard(task: tuple[list[str], bool, int, bool]) -> Counter:
    """Step 3 for one shard: byte-label Viterbi of every chunk, all chunks in lockstep; returns piece counts."""
    texts, isolate_digits, order, ensure_unicode = task
    buf, starts = _training_chunks(texts, isolate_digits)
    if len(buf) == 0:
        return Counter()
    nodes = np.empty((len(buf), order))
    for j, (codes, valid) in enumerate(_ngram_codes(buf, starts, order)):
        nodes[:, j] = np.where(valid, _lookup(*_TABLES[j + 1], codes), -np.inf)
    if ensure_unicode:
        nodes[(buf >= 128) & (buf < 192), 0] = -np.inf  # a piece may not start inside a UTF-8 character

    trans = np.full((order, order), -np.inf)
    for i in range(order):
        trans[i, 0] = 0.0
        trans[i, min(i + 1, order - 1)] = 0.0
    lengths = np.diff(starts)
    by_length = np.argsort(-lengths, kind="stable")
    first, size = starts[:-1][by_length], lengths[by_length]
    # active[t] = number of chunks longer than t (chunks sorted by decreasing length)
    active = np.searchsorted(-size, -np.arange(size[0] + 1), side="left")
    routes = np.zeros((len(buf), order), dtype=np.int8)
    score = nodes[first].copy()
    for t in range(1, int(size[0])):
        m = active[t]
        rows = first[:m] + t
        # same expression and evaluation order as the reference: (prev[:, None] + trans) + node
        cand = (score[:m, :, None] + trans) + nodes[rows][:, None, :]
        routes[rows] = cand.argmax(axis=1)
        score[:m] = cand.max(axis=1)

    states = np.empty(len(buf), dtype=np.int8)
    state = score.argmax(axis=1).astype(np.int8)
    for t in range(int(size[0]) - 1, -1, -1):
        m = active[t]
        rows = first[:m] + t
        ending = size[:m] - 1 == t
        state[:m] = np.where(ending, score[:m].argmax(axis=1), state[:m])
        states[rows] = state[:m]
        if t > 0:
            state[:m] = routes[rows, state[:m]]

    is_start = states == 0
    data = buf.tobytes()
    pieces: Counter = Counter()
    for s, e in zip(starts[:-1], starts[1:]):
        bounds = np.flatnonzero(is_start[s:e]) + s
        ends = np.append(bounds[1:], e)
        pieces.update(data[a:b] for a, b in zip(bounds.tolist(), ends.tolist()))
    return pieces


def _split_counts(keep: dict[bytes, int], items: Iterable[tuple[bytes, int]]) -> dict[bytes, int]:
    """Segment each piece of ``items`` with the Unigram model of ``keep`` and add its count to the parts.

    This is ``bytepiece.Trainer.split_pieces``: the model's scores are ``log(count / total)`` of ``keep``.
    """
    items = list(items)
    names = list(keep)
    scores = log_probs(list(keep.values()))
    segmenter = c_segmenter(names, scores.tolist(), first_id=0)
    if segmenter is not None:
        ids = segment_in_threads(segmenter, [p for p, _ in items], lines=False)
    else:
        model = models.Unigram(
            [(bytes_to_byte_level(p), float(s)) for p, s in zip(names, scores)], unk_id=None, byte_fallback=False
        )
        encodings = Tokenizer(model).encode_batch_fast(
            [bytes_to_byte_level(p) for p, _ in items], add_special_tokens=False
        )
        ids = [e.ids for e in encodings]
    flat = np.fromiter((i for row in ids for i in row), dtype=np.int64)
    weights = np.repeat(np.array([c for _, c in items], dtype=np.float64), [len(row) for row in ids])
    totals = np.bincount(flat, weights=weights, minlength=len(names))
    return {names[i]: int(totals[i]) for i in np.flatnonzero(totals)}


def _prune_wasted(keep: dict[bytes, int], bar: Any) -> dict[bytes, int]:
    while True:
        size = len(keep)
        keep = _split_counts(keep, keep.items())
        bar.update(1)
        if len(keep) == size:
            return keep


def _prune_pieces(pieces: Counter, vocab_size: int, max_piece_length: int, min_count: int, progress: bool) -> dict:
    """Step 4 (``bytepiece.Trainer.prune_pieces`` for one vocabulary size)."""
    for b in range(256):
        pieces.setdefault(bytes([b]), 1)
    keep, drop = {}, {}
    for piece, count in pieces.items():
        if len(piece) == 1 or (len(piece) <= max_piece_length and count >= min_count):
            keep[piece] = count
        else:
            drop[piece] = count
    with tqdm(desc="prune pieces", unit="pass", disable=not progress) as bar:
        for piece, count in _split_counts(keep, drop.items()).items():
            keep[piece] += count
        keep = _prune_wasted(keep, bar)
        if len(keep) > vocab_size - NUM_RESERVED:
            ranked = sorted(keep.items(), key=lambda t: (len(t[0]) > 1, -t[1], -len(t[0]), t[0]))
            keep = dict(ranked[: vocab_size - NUM_RESERVED])
            for piece, count in _split_counts(keep, ranked[vocab_size - NUM_RESERVED :]).items():
                keep[piece] += count
            keep = _prune_wasted(keep, bar)
    return keep


def _shards(texts: Iterable[str]) -> Iterator[list[str]]:
    shard: list[str] = []
    size = 0
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must hold str, got {type(text).__name__}")
        shard.append(text)
        size += len(text)
        if size >= _SHARD_CHARS:
            yield shard
            shard, size = [], 0
    if shard:
        yield shard


def _run(fn: Any, tasks: list, workers: int, desc: str, progress: bool, tables: list | None = None) -> list:
    """``map(fn, tasks)`` over ``workers`` processes (in order), with a progress bar."""
    bar = tqdm(total=len(tasks), desc=desc, unit="shard", disable=not progress)
    try:
        if workers <= 1 or len(tasks) <= 1:
            if tables is not None:
                _set_tables(tables)
            out = []
            for task in tasks:
                out.append(fn(task))
                bar.update(1)
            return out
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        initargs = (tables if tables is not None else [],)
        with context.Pool(min(workers, len(tasks)), initializer=_set_tables, initargs=initargs) as pool:
            out = []
            for result in pool.imap(fn, tasks):
                out.append(result)
                bar.update(1)
            return out
    finally:
        bar.close()
        _set_tables([])  # do not keep the n-gram tables alive after training


def train_bytepiece(
    texts: Iterable[str],
    vocab_size: int = 40000,
    output: str | os.PathLike = "x.model",
    *,
    order: int = 6,
    max_piece_length: int = 36,
    min_count: int | None = None,
    isolate_digits: bool = False,
    ensure_unicode: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> str:
    """Train a BytePiece model and write it in the reference file format.

    The result is the model ``bytepiece.Trainer(order, vocab_size, max_piece_length, min_count, isolate_digits,
    ensure_unicode).train(texts)`` would save, computed faster (vectorised n-gram counting and Viterbi, parallel over
    shards of documents and in the Rust Unigram backend). Deterministic: the same texts give the same file whatever
    ``workers`` is.

    Args:
        texts: training documents (a list, a dataset column, or any iterable of ``str``; it is read once).
        vocab_size: maximum number of token ids including the 3 reserved ones (at least 259: every byte is a piece).
            The trained vocabulary can be slightly smaller, as in the reference.
        output: path of the model file to write.
        order: n-gram order of the byte language model that proposes pieces (1-8; the reference default is 6).
        max_piece_length: longest piece in bytes.
        min_count: n-grams and pieces seen fewer times are pruned; ``None`` means the reference default, 2.
        isolate_digits: train on chunks where every digit stands alone, so no piece contains a digit with other
            characters (the reference's ``id`` models).
        ensure_unicode: forbid pieces that start inside a UTF-8 character, so every multi-byte piece is valid UTF-8
            (the reference's ``eu`` models; note the reference ``Trainer`` defaults to ``True``).
        workers: processes for counting and segmentation; ``None`` uses all available CPU cores.
        progress: show tqdm progress bars.

    Returns:
        ``output``, as a string. Load it with ``BytePieceTokenizerFast.from_bytepiece(output)``.

    Raises:
        TypeError: ``texts`` is a single string or holds non-strings.
        ValueError: a setting is out of range, a text holds a lone surrogate, or the corpus is empty.
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be an iterable of documents (e.g. a list of str), not a single string")
    if not isinstance(vocab_size, int) or vocab_size < 256 + NUM_RESERVED:
        raise ValueError(
            f"vocab_size must be at least {256 + NUM_RESERVED} (256 bytes + 3 reserved ids), got {vocab_size}"
        )
    if not isinstance(order, int) or not 1 <= order <= _MAX_ORDER:
        raise ValueError(f"order must be an integer in 1..{_MAX_ORDER}, got {order}")
    if not isinstance(max_piece_length, int) or max_piece_length < 1:
        raise ValueError(f"max_piece_length must be a positive integer, got {max_piece_length}")
    min_count = 2 if min_count is None else min_count
    if not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count must be a positive integer, got {min_count}")
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers}")

    shards = list(_shards(texts))
    counted = _run(_count_shard, [(s, isolate_digits, order) for s in shards], workers, "count n-grams", progress)
    total = sum(n for n, _ in counted)
    if total == 0:
        raise ValueError("the training texts are empty")
    tables = [_merge_counts([c[n] for _, c in counted]) for n in range(order)]
    log_tables = [(np.zeros(0, dtype=np.uint64), np.zeros(0)), *_ngram_log_probs(total, tables, min_count)]
    del counted, tables
    tasks = [(s, isolate_digits, order, ensure_unicode) for s in shards]
    pieces: Counter = Counter()
    for part in _run(_segment_shard, tasks, workers, "segment", progress, tables=log_tables):
        pieces.update(part)
    final = _prune_pieces(pieces, vocab_size, max_piece_length, min_count, progress)
    return write_bytepiece_model(final, output)
