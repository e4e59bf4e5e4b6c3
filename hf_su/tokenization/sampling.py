"""Exact Viterbi sampling (subword regularization) for Unigram tokenizers.

A Unigram tokenizer scores a segmentation ``s`` of a word by ``Σ_{w∈s} log p(w)`` and its ``encode`` returns the
best one (Viterbi). Subword regularization instead *samples* a segmentation with probability

    P(s) ∝ Π_{w∈s} p(w)^α,

which is the law of Su Jianlin's "perfect" Viterbi Sampling (bytepiece >= 0.5) and of SentencePiece's sampling
with an unlimited n-best list. Conventions follow bytepiece: ``alpha < 0`` is the deterministic encode,
``alpha = 0`` is uniform over all segmentations, ``alpha > 0`` is the law above.

The sampler runs on the tokenizer's own lattice. Text goes through the backend's normalizer and pre-tokenizer;
the vocabulary (pieces and log-probabilities) comes from the backend's JSON, compiled once per tokenizer into a
double-array trie, so all matches of a batch are found with vectorised NumPy look-ups (one step per character of
depth, from every position at once). Sampling is
forward filtering / backward sampling: ``log Z`` of every lattice position by a log-sum-exp recursion, then at every
position one incoming edge is drawn with probability ``exp(log Z[start] + α·score − log Z[end])`` (Gumbel-max,
all positions at once), and the path is read back from each end. Positions that no multi-character edge spans
cut the lattice into independent short segments, so the sequential parts of the recursion run over all segments
of a batch together.

``HF tokenizers``' own Unigram ``alpha``/``nbest_size`` sampling follows a different law and is not saved with the
tokenizer; this module does not use it.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
import sys
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import PreTokenizedString

__all__ = ["SubwordRegularization", "encode_sampled", "viterbi_sample"]

# tokenizers' Unigram gives a character that no piece covers an <unk> node scored min(score) - 10
_UNK_PENALTY = 10.0
_BLOCK_CHARS = 1 << 17  # characters per vectorised block: bounds memory, keeps arrays cache-resident


def _backend(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind a fast tokenizer (or the tokenizer itself)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not (hasattr(backend, "to_str") and hasattr(backend, "encode_batch")):
        raise TypeError(
            f"expected a Hugging Face fast tokenizer (PreTrainedTokenizerFast) or a tokenizers.Tokenizer, "
            f"got {type(tokenizer).__name__}"
        )
    return backend


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite (alpha < 0 means deterministic encode), got {alpha}")
    return alpha


def _text_type_error(text: Any) -> TypeError:
    return TypeError(f"texts must be str or a sequence of str, got an element of type {type(text).__name__}")


def _as_generator(generator: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(generator, np.random.Generator):
        return generator
    if generator is None or (isinstance(generator, (int, np.integer)) and not isinstance(generator, bool)):
        return np.random.default_rng(generator)
    raise TypeError(f"generator must be a numpy.random.Generator, an int seed or None, got {type(generator).__name__}")


def _double_array(children: list[dict[int, int]], n_sym: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lay a trie out as a double array, so one vectorised trie step is two look-ups.

    The child of the node in slot ``u`` by symbol ``c >= 1`` sits in slot ``base[u] + c`` and exists iff
    ``check[base[u] + c] == u``. Nodes are placed breadth-first, each at the first base where its children fit
    (a node with several children tries a few free slots, then takes fresh space at the end).

    Args:
        children: for every node (root: 0), its children by symbol.
        n_sym: symbols are ``1 .. n_sym - 1``.

    Returns:
        ``base`` and ``check`` indexed by slot (every ``base + symbol`` is a valid index), and each node's slot.
    """
    slot = [0] * len(children)
    base = [0] * len(children)
    check = [-1] * (len(children) + n_sym)
    hint = list(range(len(check)))  # hint[i] <= the first free slot >= i (union-find with path halving)

    def grow(size: int) -> None:
        hint.extend(range(len(check), size))
        check.extend([-1] * (size - len(check)))

    def first_free(i: int) -> int:
        while True:
            if i >= len(check):
                grow(i + n_sym)
            if check[i] == -1:
                return i
            hint[i] = hint[hint[i]] if hint[i] < len(hint) else hint[i]
            i = max(hint[i], i + 1)

    queue = [0]
    for node in queue:  # appended to while walked: breadth-first order
        if not children[node]:
            continue
        syms = sorted(children[node])
        lowest, rest = syms[0], syms[1:]
        start, tries = first_free(lowest), 0  # the slot of the lowest child
        while not all(start - lowest + c >= len(check) or check[start - lowest + c] == -1 for c in rest):
            tries += 1
            start = first_free(start + 1) if tries < 32 else len(check) + lowest
        offset = base[node] = start - lowest
        grow(max(len(check), offset + syms[-1] + 1))
        for c in syms:
            child = children[node][c]
            slot[child] = offset + c
            check[offset + c] = slot[node]
            hint[offset + c] = offset + c + 1
            queue.append(child)
    check[0] = -2  # the root is nobody's child
    base_by_slot = np.zeros(len(check), dtype=np.int32)
    base_by_slot[slot] = base
    check_array = np.full(max(len(check), max(base) + n_sym), -1, dtype=np.int32)
    check_array[: len(check)] = check
    return base_by_slot, check_array, np.array(slot, dtype=np.int64)


@dataclass
class _Lattice:
    """Edges of a lattice over ``n`` characters: edge ``k`` covers characters ``start[k] : start[k] + length[k]``."""

    n: int
    start: np.ndarray  # int32
    length: np.ndarray  # int32
    piece: np.ndarray  # int32 piece id, -1 on <unk> edges
    score: np.ndarray  # float64 log-probability


def sample_lattice_paths(lattice: _Lattice, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Draw one path from position 0 to ``lattice.n`` with probability ``∝ exp(alpha · Σ score)``.

    Positions that no edge spans split the lattice into independent segments (e.g. words, since no edge crosses a
    word boundary), each sampled with its own law.

    Args:
        lattice: the edges; every character position must be reachable (every character has a length-1 edge).
        alpha: inverse temperature ``>= 0``.
        rng: source of randomness.

    Returns:
        The indices of the chosen edges, ordered by position.
    """
    n, start, length = lattice.n, lattice.start, lattice.length
    end = start + length
    # a boundary q is a cut when no edge covers characters on both sides of it
    long_edges = length > 1
    spans = np.bincount(start[long_edges] + 1, minlength=n + 2)[: n + 1]
    spans -= np.bincount(end[long_edges], minlength=n + 2)[: n + 1]
    cut = np.cumsum(spans) == 0
    positions = np.arange(n + 1, dtype=np.int32)
    segment_start = np.maximum.accumulate(np.where(cut, positions, 0))
    edge_segment_start = segment_start[start]
    rel_end = end - edge_segment_start
    # starts of segments read log Z = 0 from a dedicated slot: a segment's start is also its predecessor's end
    read = np.where(start == edge_segment_start, n + 1, start)

    max_rel = int(rel_end.max(initial=0))
    narrow = np.uint8 if max_rel < 256 else np.uint16 if max_rel < 65536 else rel_end.dtype
    order = np.argsort(rel_end.astype(narrow), kind="stable")  # a radix sort for 8/16-bit keys
    read, end, weight = read[order], end[order], alpha * lattice.score[order]
    step_ptr = np.concatenate(([0], np.cumsum(np.bincount(rel_end, minlength=2)))).tolist()

    # Forward: log Z[e] = logsumexp over edges (s, e) of log Z[s] + weight, one relative position per step for all
    # segments at once. Backward draw (Gumbel-max): at each e, the edge with the largest log Z[s] + weight + G
    # (G ~ Gumbel) is chosen, with probability ∝ exp(log Z[s] + weight). All edges into e share a step, so both
    # happen in the same step; the largest key also stabilises the sum (it exceeds the largest term by about G).
    log_z = np.full(n + 2, -np.inf)
    log_z[n + 1] = 0.0
    total = np.zeros(n + 1)
    best = np.full(n + 1, -np.inf)
    route = np.empty(n + 1, np.int32)
    for a, b in zip(step_ptr[1:-1], step_ptr[2:]):
        if a == b:
            continue
        e = end[a:b]
        v = log_z[read[a:b]] + weight[a:b]
        key = v - np.log(rng.standard_exponential(b - a))
        np.maximum.at(best, e, key)
        m = best[e]
        won = np.flatnonzero(key == m)
        route[e[won]] = order[a + won]
        np.add.at(total, e, np.exp(v - m))
        log_z[e] = m + np.log(total[e])

    # read each segment's path backwards from its end
    seg_bounds = np.flatnonzero(cut)
    cur, first = seg_bounds[1:], seg_bounds[:-1]
    token_at = np.full(n, -1, np.int32)
    while cur.size:
        edge = route[cur]
        s = start[edge]
        token_at[s] = edge
        more = s > first
        cur, first = s[more], first[more]
    return token_at[token_at >= 0]


class _CompiledUnigram:
    """A Unigram vocabulary compiled for vectorised matching, plus what is needed to turn text into words."""

    def __init__(self, backend: Any) -> None:
        spec = json.loads(backend.to_str())
        model = spec.get("model") or {}
        if model.get("type") != "Unigram":
            raise ValueError(
                f"Viterbi sampling needs a tokenizer whose model is tokenizers.models.Unigram, got model type "
                f"{model.get('type')!r}"
            )
        vocab = model["vocab"]
        scores = np.array([score for _, score in vocab], dtype=np.float64)
        # the last slot scores <unk> edges (piece -1)
        self.scores = np.append(scores, (scores.min() if scores.size else 0.0) - _UNK_PENALTY)
        self.unk_id: int | None = model.get("unk_id")
        self.byte_fallback = bool(model.get("byte_fallback", False))
        self.byte_ids = {piece: i for i, (piece, _) in enumerate(vocab) if re.fullmatch(r"<0x[0-9A-F]{2}>", piece)}

        added = backend.get_added_tokens_decoder()
        self.added_ids = frozenset(added)
        # tokenizers extracts added tokens before the model: normalized=False ones from the raw text,
        # normalized=True ones from the normalized text
        self.raw_added = self._pattern(tok.content for tok in added.values() if not tok.normalized)
        self.normalized_added = self._pattern(tok.content for tok in added.values() if tok.normalized)
        normalizer = backend.normalizer
        self._normalize = None if normalizer is None else normalizer.normalize_str
        self._pre_tokenize = None if backend.pre_tokenizer is None else backend.pre_tokenizer.pre_tokenize
        self.affixes: tuple[list[int], list[int]] | None = None
        self._build_trie([piece if i not in self.added_ids else "" for i, (piece, _) in enumerate(vocab)])

    def _build_trie(self, pieces: list[str]) -> None:
        alphabet = sorted({ch for piece in pieces for ch in piece})
        self.n_sym = len(alphabet) + 1  # symbol 0: a character that occurs in no piece
        sym_of = {ch: i + 1 for i, ch in enumerate(alphabet)}
        self.sym_table = np.zeros((ord(alphabet[-1]) if alphabet else 0) + 2, dtype=np.int32)
        self.sym_table[[ord(ch) for ch in alphabet]] = np.arange(1, self.n_sym)

        children: list[dict[int, int]] = [{}]
        terminal = [-1]
        for piece_id, piece in enumerate(pieces):
            node = 0
            for ch in piece:
                sym = sym_of[ch]
                child = children[node].get(sym)
                if child is None:
                    child = children[node][sym] = len(terminal)
                    children.append({})
                    terminal.append(-1)
                node = child
            if piece:
                terminal[node] = piece_id  # a duplicated piece takes its last id, as in tokenizers' Unigram
        self._base, self._check, slot = _double_array(children, self.n_sym)
        self._terminal = np.full(len(self._check), -1, dtype=np.int32)
        self._terminal[slot] = terminal

    def lattice(self, words: Sequence[str]) -> tuple[_Lattice, np.ndarray]:
        """All vocabulary matches inside each word (plus <unk> edges), and the word boundaries."""
        joined = "".join(words)
        lengths = np.fromiter(map(len, words), np.int32, len(words))
        bounds = np.concatenate(([0], np.cumsum(lengths)))
        n = int(bounds[-1])
        codes = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
        sym = self.sym_table[np.minimum(codes, len(self.sym_table) - 1)]
        # the next-character symbol is 0 at word starts (and past the end), so no match crosses a word boundary
        next_sym = np.append(sym, 0)
        next_sym[bounds[:-1]] = 0

        # walk the trie from every position at once: one vectorised step per character of depth
        starts, pieces = [], []
        pos = np.arange(n, dtype=np.int32)
        node = np.zeros(n, dtype=np.int32)
        depth = 0
        while pos.size:
            child = self._base[node] + (sym[pos] if depth == 0 else next_sym[pos + depth])
            alive = self._check[child] == node
            pos, node = pos[alive], child[alive]
            depth += 1
            piece = self._terminal[node]
            hit = piece >= 0
            starts.append(pos[hit])
            pieces.append(piece[hit])

        n_depths = len(starts)
        has_single = np.zeros(n, dtype=bool)
        if starts:
            has_single[starts[0]] = True
        uncovered = np.flatnonzero(~has_single).astype(np.int32)
        if uncovered.size:
            if self.unk_id is None:
                ch = joined[uncovered[0]]
                raise ValueError(
                    f"the text has a character ({ch!r}) that no vocabulary piece covers and the Unigram model has "
                    f"no unk_id: the tokenizer itself cannot encode it"
                )
            starts.append(uncovered)
            pieces.append(np.full(uncovered.size, -1, dtype=np.int32))  # -1 marks an <unk> edge
        depths = [*range(1, n_depths + 1), *([1] if uncovered.size else [])]
        length = np.repeat(np.array(depths, dtype=np.int32), [len(s) for s in starts])
        piece = np.concatenate(pieces)
        return _Lattice(n, np.concatenate(starts), length, piece, self.scores[piece]), bounds

    def sample_words(
        self, words: Sequence[str], alpha: float, rng: np.random.Generator, groups: Sequence[int] | None = None
    ) -> list[list[int]]:
        """Sample a segmentation of every word; return the ids of each group of consecutive words (default: each)."""
        group_ptr = np.arange(len(words) + 1) if groups is None else np.concatenate(([0], np.cumsum(groups)))
        if not any(words):
            return [[] for _ in range(len(group_ptr) - 1)]
        lattice, bounds = self.lattice(words)
        chosen = sample_lattice_paths(lattice, alpha, rng)
        token_start = lattice.start[chosen]
        ids = lattice.piece[chosen]
        cuts = np.searchsorted(token_start, bounds[group_ptr]).tolist()
        ids_list = ids.tolist()
        out = [ids_list[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
        if (ids < 0).any():
            joined, starts, lengths = "".join(words), token_start.tolist(), lattice.length[chosen].tolist()
            bounds_list = bounds.tolist()
            for g, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
                if any(i < 0 for i in out[g]):
                    out[g] = self._resolve_unknown(joined, bounds_list, out[g], starts[a:b], lengths[a:b])
        return out

    def _resolve_unknown(
        self, joined: str, bounds: list[int], ids: list[int], starts: list[int], lengths: list[int]
    ) -> list[int]:
        """Replace <unk> edges as tokenizers' Unigram does: runs inside a word fuse, then byte fallback or unk_id."""
        out: list[int] = []
        pending, pending_word = "", -1
        for i, s, ln in zip(ids, starts, lengths):
            word = bisect.bisect_right(bounds, s) - 1
            if i < 0 and pending and word == pending_word:
                pending += joined[s : s + ln]
                continue
            if pending:
                out.extend(self._unknown_ids(pending))
                pending = ""
            if i < 0:
                pending, pending_word = joined[s : s + ln], word
            else:
                out.append(i)
        if pending:
            out.extend(self._unknown_ids(pending))
        return out

    def _unknown_ids(self, text: str) -> list[int]:
        if self.byte_fallback:
            byte_ids = [self.byte_ids.get(f"<0x{b:02X}>") for b in text.encode("utf-8")]
            if all(i is not None for i in byte_ids):
                return byte_ids  # type: ignore[return-value]
        return [self.unk_id]  # type: ignore[list-item]

    @staticmethod
    def _pattern(contents: Iterable[str]) -> re.Pattern[str] | None:
        ordered = sorted({c for c in contents if c}, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def plan(self, text: str) -> list[str] | None:
        """The words of ``text`` as the model sees them, or None when the text holds an added token."""
        if self.raw_added is not None and self.raw_added.search(text):
            return None
        if self._normalize is not None:
            text = self._normalize(text)
        if self.normalized_added is not None and self.normalized_added.search(text):
            return None
        if self._pre_tokenize is None:
            return [text]
        # what pre_tokenize_str does, minus the conversion of offsets to characters we would not use
        words = PreTokenizedString(text)
        self._pre_tokenize(words)
        return [word for word, _, _ in words.get_splits(offset_referential="normalized", offset_type="byte")]

    def words_from_encoding(self, encoding: Any) -> list[int | str]:
        """Split a deterministic encoding into fixed ids (added and special tokens) and words to re-sample."""
        byte_value = {i: int(piece[3:5], 16) for piece, i in self.byte_ids.items()} if self.byte_fallback else {}
        items: list[int | str] = []
        word_id: int | None = None
        parts: list[str] = []
        raw = bytearray()

        def flush() -> None:
            if raw:
                parts.append(raw.decode("utf-8"))
                raw.clear()
            if parts:
                items.append("".join(parts))
                parts.clear()

        for token_id, token, wid in zip(encoding.ids, encoding.tokens, encoding.word_ids):
            if token_id in self.added_ids or wid is None:
                flush()
                items.append(token_id)
                word_id = None
                continue
            if wid != word_id:
                flush()
                word_id = wid
            if token_id in byte_value:
                raw.append(byte_value[token_id])
                continue
            if raw:
                parts.append(raw.decode("utf-8"))
                raw.clear()
            parts.append(token)
        flush()
        return items


_COMPILED: weakref.WeakKeyDictionary[Any, tuple[int, _CompiledUnigram]] = weakref.WeakKeyDictionary()


def _compiled(backend: Any) -> _CompiledUnigram:
    """The compiled vocabulary of a backend tokenizer, built once and cached while the tokenizer lives."""
    size = backend.get_vocab_size(with_added_tokens=True)
    cached = _COMPILED.get(backend)
    if cached is None or cached[0] != size:
        cached = (size, _CompiledUnigram(backend))
        _COMPILED[backend] = cached
    return cached[1]


def _special_affixes(backend: Any) -> tuple[list[int], list[int]]:
    """The ids the post-processor puts before and after a single sequence (found once per tokenizer)."""
    compiled = _compiled(backend)
    if compiled.affixes is None:
        compiled.affixes = _probe_affixes(backend)
    return compiled.affixes


def _probe_affixes(backend: Any) -> tuple[list[int], list[int]]:
    for probe in ("a", "0", " ", "x y"):
        try:
            plain = backend.encode(probe, add_special_tokens=False).ids
            full = backend.encode(probe, add_special_tokens=True).ids
        except Exception:  # noqa: BLE001 - a probe the vocabulary cannot encode; try the next one
            continue
        if not plain:
            continue
        for i in range(len(full) - len(plain) + 1):
            if full[i : i + len(plain)] == plain:
                return full[:i], full[i + len(plain) :]
    raise ValueError("could not determine where the tokenizer's post-processor adds its special tokens")


def _split_words(words: list[str], size: int) -> list[list[str]]:
    """Consecutive runs of whole words of about ``size`` characters (a huge text is sampled in pieces)."""
    if not words:
        return [words]
    ends = np.cumsum(np.fromiter(map(len, words), np.int64, len(words)))
    cuts = np.unique(np.searchsorted(ends, np.arange(size, ends[-1], size), side="right")).tolist()
    bounds = [0, *cuts, len(words)]
    return [words[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _bytepiece(tokenizer: Any) -> Any | None:
    """The tokenizer if it is a ``BytePieceTokenizerFast`` (which samples in its C segmenter), else None."""
    from .bytepiece import BytePieceTokenizerFast

    return tokenizer if isinstance(tokenizer, BytePieceTokenizerFast) else None


def _bytepiece_sample(
    tokenizer: Any, texts: Sequence[str], alpha: float, rng: np.random.Generator
) -> list[list[int]] | None:
    """A BytePiece tokenizer samples in its C segmenter (same law, one pass per chunk); None for other tokenizers
    and when the C segmenter cannot serve it. No NumPy lattice is compiled on this path."""
    bytepiece = _bytepiece(tokenizer)
    if bytepiece is None:
        return None
    for text in texts:
        if not isinstance(text, str):
            raise _text_type_error(text)
    return bytepiece._sampled_raw_ids(texts, alpha, rng)


def _tokenizer_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """:func:`_special_affixes`, read from a BytePiece tokenizer's template when it has one (no lattice compiled)."""
    bytepiece = _bytepiece(tokenizer)
    affixes = None if bytepiece is None else bytepiece._special_affixes(True)
    return affixes if affixes is not None else _special_affixes(_backend(tokenizer))


def _encode_many(
    tokenizer: Any, texts: Sequence[str], alpha: float, rng: np.random.Generator, add_special_tokens: bool
) -> list[list[int]]:
    backend = _backend(tokenizer)
    if alpha >= 0:
        sampled = _bytepiece_sample(tokenizer, texts, alpha, rng)
        if sampled is not None:
            prefix, suffix = _tokenizer_affixes(tokenizer) if add_special_tokens else ([], [])
            return [prefix + ids + suffix for ids in sampled] if prefix or suffix else sampled
    compiled = _compiled(backend)
    if alpha < 0:
        for text in texts:
            if not isinstance(text, str):
                raise _text_type_error(text)
        return [enc.ids for enc in backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
    prefix, suffix = _special_affixes(backend) if add_special_tokens else ([], [])

    results: list[list[int]] = [[] for _ in texts]
    whole: set[int] = set()  # texts encoded by tokenizers first (added tokens inside), special tokens included
    # words go through the vectorised sampler in blocks of about _BLOCK_CHARS characters
    block_words: list[str] = []
    block_texts: list[int] = []
    block_counts: list[int] = []
    block_chars = 0

    def flush() -> None:
        for index, ids in zip(block_texts, compiled.sample_words(block_words, alpha, rng, block_counts)):
            results[index] += ids
        block_words.clear()
        block_texts.clear()
        block_counts.clear()

    plan = compiled.plan
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise _text_type_error(text)
        words = plan(text)
        if words is None:  # an added token inside: let tokenizers split it out, re-sample the words around it
            encoding = backend.encode(text, add_special_tokens=add_special_tokens)
            items = compiled.words_from_encoding(encoding)
            sampled = iter(compiled.sample_words([w for w in items if isinstance(w, str)], alpha, rng))
            results[index] = [i for item in items for i in ([item] if isinstance(item, int) else next(sampled))]
            whole.add(index)
            continue
        parts = [words] if len(text) <= _BLOCK_CHARS else _split_words(words, _BLOCK_CHARS)
        for part in parts:
            block_words += part
            block_texts.append(index)
            block_counts.append(len(part))
            block_chars += len(text) if len(parts) == 1 else _BLOCK_CHARS
            if block_chars >= _BLOCK_CHARS:
                flush()
                block_chars = 0
    if block_texts:
        flush()
    if add_special_tokens:
        results = [ids if index in whole else prefix + ids + suffix for index, ids in enumerate(results)]
    return results


def encode_sampled(
    tokenizer: Any,
    texts: str | Sequence[str],
    alpha: float = 0.1,
    seed: int | np.random.Generator | None = None,
    *,
    add_special_tokens: bool = False,
) -> list[int] | list[list[int]]:
    """Encode text with a randomly sampled segmentation (subword regularization).

    Each word is segmented with probability ``∝ Π_{w∈s} p(w)^alpha`` over all segmentations in the tokenizer's
    Unigram lattice, independently across words and texts; ``decode`` of a sample equals ``decode`` of ``encode``.

    Args:
        tokenizer: a fast tokenizer (or ``tokenizers.Tokenizer``) whose model is ``tokenizers.models.Unigram``,
            e.g. ``BytePieceTokenizerFast`` or a SentencePiece-style (T5, ALBERT, XLNet) tokenizer.
        texts: one text or a sequence of texts.
        alpha: ``< 0``: the deterministic encode (identical to the tokenizer's); ``0``: uniform over all
            segmentations; ``> 0``: inverse temperature of the law above (bytepiece's convention).
        seed: an int seed, a ``numpy.random.Generator`` (advanced in place) or None for fresh entropy.
        add_special_tokens: add the post-processor's special tokens (e.g. BOS/EOS) around each text.

    Returns:
        A list of token ids for a ``str``, a list of such lists for a sequence of texts.

    Raises:
        ValueError: if the model is not Unigram, alpha is NaN or infinite, or the text has a character the
            tokenizer itself cannot encode.
        TypeError: if the tokenizer, texts, alpha or seed have the wrong type.
    """
    alpha = _check_alpha(alpha)
    rng = _as_generator(seed)
    if isinstance(texts, str):
        return _encode_many(tokenizer, [texts], alpha, rng, add_special_tokens)[0]
    if not isinstance(texts, Iterable):
        raise TypeError(f"texts must be str or a sequence of str, got {type(texts).__name__}")
    return _encode_many(tokenizer, list(texts), alpha, rng, add_special_tokens)


def viterbi_sample(
    tokenizer: Any,
    text: str,
    alpha: float = 0.1,
    *,
    generator: np.random.Generator | int | None = None,
    add_special_tokens: bool = False,
) -> list[int]:
    """Sample one segmentation of ``text`` with probability ``∝ Π_{w∈s} p(w)^alpha`` (exact Viterbi sampling).

    Args:
        tokenizer: a fast tokenizer (or ``tokenizers.Tokenizer``) whose model is ``tokenizers.models.Unigram``.
        text: the text to encode.
        alpha: ``< 0`` deterministic encode, ``0`` uniform over segmentations, ``> 0`` the law above.
        generator: a ``numpy.random.Generator`` (advanced in place), an int seed, or None for fresh entropy.
        add_special_tokens: add the post-processor's special tokens around the text.

    Returns:
        The token ids of the sampled segmentation.

    Example:
        >>> ids = viterbi_sample(tokenizer, "subword regularization", alpha=0.1, generator=np.random.default_rng(0))
        >>> tokenizer.decode(ids) == tokenizer.decode(tokenizer.encode("subword regularization"))
        True
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return encode_sampled(tokenizer, text, alpha, _as_generator(generator), add_special_tokens=add_special_tokens)


def _worker_key() -> tuple[int, int, int, int]:
    """(pid, rank, DataLoader worker id + 1 or 0, the worker's per-epoch torch seed): what tells streams apart."""
    rank = worker = worker_seed = 0
    torch = sys.modules.get("torch")  # a DataLoader worker or a distributed run has imported torch already
    if torch is not None:
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        info = torch.utils.data.get_worker_info()
        if info is not None:
            worker, worker_seed = info.id + 1, info.seed % (1 << 63)
    return os.getpid(), rank, worker, worker_seed


class SubwordRegularization:
    """Re-sample the segmentation of each text every time it is read: a ``datasets`` transform and a data collator.

    As a transform, ``dataset.set_transform(SubwordRegularization(tokenizer))`` tokenizes the text column on every
    access, so each epoch sees fresh segmentations. As a collator, ``Trainer(data_collator=SubwordRegularization(
    tokenizer, collator=DataCollatorForLanguageModeling(tokenizer, mlm=False)))`` tokenizes raw-text examples and
    passes the features on (default: ``DataCollatorWithPadding``). With either, give ``Trainer``
    ``TrainingArguments(remove_unused_columns=False)`` so the text column reaches it.

    Randomness: each process (main, DataLoader worker, distributed rank) draws from its own stream, created when it
    first samples. With ``seed=None`` the streams take fresh OS entropy. With an int seed a stream is seeded by
    ``(seed, rank, worker id, worker seed)``: workers differ from each other and, since torch re-draws worker seeds
    every epoch from its own (``Trainer``-seeded) generator, from epoch to epoch, and a run is reproducible given the
    seed and torch's seed.

    Args:
        tokenizer: a fast tokenizer whose model is ``tokenizers.models.Unigram``.
        alpha: sampling inverse temperature (``< 0`` deterministic, ``0`` uniform; see :func:`encode_sampled`).
        seed: int seed for reproducible streams, or None.
        text_column: the column (transform) or example key (collator) holding the text.
        add_special_tokens: add the post-processor's special tokens (BOS/EOS...) as ``tokenizer(text)`` does.
        max_length: if set, keep at most this many ids per example (content is cut, special tokens kept).
        collator: what the tokenized features are passed to in collator mode; by default
            ``DataCollatorWithPadding(tokenizer)``.
    """

    def __init__(
        self,
        tokenizer: Any,
        alpha: float = 0.1,
        seed: int | None = None,
        *,
        text_column: str = "text",
        add_special_tokens: bool = True,
        max_length: int | None = None,
        collator: Any = None,
    ) -> None:
        self.alpha = _check_alpha(alpha)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        if seed is not None and seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be a positive int or None, got {max_length}")
        if _bytepiece(tokenizer) is None:
            _compiled(_backend(tokenizer))  # fail early on a non-Unigram tokenizer (BytePiece is Unigram)
        self.tokenizer = tokenizer
        self.seed = seed
        self.text_column = text_column
        self.add_special_tokens = add_special_tokens
        self.max_length = max_length
        self.collator = collator
        self._rng: np.random.Generator | None = None
        self._rng_key: tuple[int, int, int, int] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_rng"] = state["_rng_key"] = None  # a copy in another process starts its own stream
        return state

    @property
    def generator(self) -> np.random.Generator:
        """This process's random stream."""
        key = _worker_key()
        if self._rng is None or key != self._rng_key:
            entropy = None if self.seed is None else [int(self.seed), *key[1:]]
            self._rng, self._rng_key = np.random.default_rng(entropy), key
        return self._rng

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Sampled ids for each text, with special tokens and ``max_length`` applied."""
        ids = encode_sampled(self.tokenizer, list(texts), self.alpha, self.generator, add_special_tokens=False)
        prefix, suffix = _tokenizer_affixes(self.tokenizer) if self.add_special_tokens else ([], [])
        room = None if self.max_length is None else max(self.max_length - len(prefix) - len(suffix), 0)
        return [prefix + (seq if room is None else seq[:room]) + suffix for seq in ids]

    def __call__(self, batch: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> Any:
        """Transform a ``datasets`` batch (dict of columns) or collate a list of examples."""
        if isinstance(batch, Mapping):
            if self.text_column not in batch:
                raise KeyError(
                    f"column {self.text_column!r} not in batch (columns: {list(batch)}); with Trainer set "
                    f"TrainingArguments(remove_unused_columns=False)"
                )
            column = batch[self.text_column]
            ids = self.encode([column] if isinstance(column, str) else list(column))
            mask = [[1] * len(seq) for seq in ids]
            if isinstance(column, str):  # a single example rather than a batch
                ids, mask = ids[0], mask[0]
            return {k: v for k, v in batch.items() if k != self.text_column} | {
                "input_ids": ids,
                "attention_mask": mask,
            }
        examples = list(batch)
        missing = [i for i, ex in enumerate(examples) if self.text_column not in ex]
        if missing:
            raise KeyError(
                f"example {missing[0]} has no {self.text_column!r} key; with Trainer set "
                f"TrainingArguments(remove_unused_columns=False)"
            )
        ids = self.encode([ex[self.text_column] for ex in examples])
        features = [
            {k: v for k, v in ex.items() if k != self.text_column}
            | {"input_ids": seq, "attention_mask": [1] * len(seq)}
            for ex, seq in zip(examples, ids)
        ]
        collator = self.collator
        if collator is None:
            from transformers import DataCollatorWithPadding

            collator = self.collator = DataCollatorWithPadding(self.tokenizer)
        return collator(features)
