"""BytePiece (Su 2023) as a Hugging Face fast tokenizer, plus reading and writing the reference model file.

BytePiece is a byte-level Unigram tokenizer: NFC-normalise the text, cut it into chunks (a line together with its
trailing newlines), and segment each chunk's UTF-8 bytes by Viterbi with piece scores ``log(count / total)``.
The reference implementation (``bojone/bytepiece``) is a Cython extension over a bytes-mode Aho-Corasick automaton.
Here the tokenizer is a ``tokenizers`` pipeline, so it saves and loads as a plain ``PreTrainedTokenizerFast``:

    NFC normalizer -> Split(chunk regex, "isolated") -> ByteLevel(use_regex=False) -> Unigram -> ByteLevel decoder

The Unigram vocabulary holds each piece mapped byte-by-byte through the GPT-2 byte-to-unicode table and the exact
float64 score the reference computes, in reference id order. Unigram's Viterbi, like the reference, keeps the first
(longest) candidate on ties, so ids are identical to ``bytepiece.Tokenizer(model).encode(text)``.

Plain encoding (the common case) skips that pipeline: a small C extension (``_viterbi.c``, a double-array trie and
the same Viterbi with the same tie rule) segments the UTF-8 bytes with the GIL released, on all cores. It is built
at install time when a C compiler is present; without it the backend's Unigram model does the same work, slower.

Model file format (the reference's): a JSON object ``{base64(piece): [id, piece.decode(errors="ignore"), count]}``
with ids ``3 .. 3 + n - 1``; ids 0/1/2 are reserved for ``<pad>``/``<bos>``/``<eos>`` and every single byte is a piece.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import math
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.tokenization_utils_base import BatchEncoding, PaddingStrategy, TruncationStrategy

try:  # the C segmenter (built by setup.py); without a compiler the backend's Unigram model does the same work
    from . import _viterbi
except ImportError:
    _viterbi = None

RESERVED_TOKENS = ("<pad>", "<bos>", "<eos>")
NUM_RESERVED = len(RESERVED_TOKENS)
# The reference's inference chunking: a line with its trailing newlines, or a last line without one.
CHUNK_PATTERN = r".*\n+|.+"
# Unigram score of the reserved ids inside the backend model: they must never win a Viterbi comparison (every
# single byte is a piece, so a finite alternative always exists) and must stay JSON-serialisable (no -inf).
_RESERVED_SCORE = -1e9
_CHUNK_RE = re.compile(CHUNK_PATTERN)
_NFC_BLOCK = 1 << 14  # characters per block of a long text's NFC normalisation (see nfc)


def _byte_to_char_table() -> str:
    """GPT-2's byte-to-unicode table as a 256-character string: printable Latin-1 bytes map to themselves, the
    others to U+0100 onwards, so every byte is one visible character. ``tokenizers``' ByteLevel uses this table."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(0x100 + n)
    return "".join(chars[b] for b in range(256))


BYTE_TO_CHAR = _byte_to_char_table()
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}
# The same chunking expressed on byte-level text: only the byte 0x0A maps to BYTE_TO_CHAR[10], and no other UTF-8
# byte sequence contains 0x0A, so splitting the mapped bytes is the same as splitting the text.
_NEWLINE_CHAR = BYTE_TO_CHAR[0x0A]
_MAPPED_CHUNK_RE = re.compile(f"[^{_NEWLINE_CHAR}]*{_NEWLINE_CHAR}+|[^{_NEWLINE_CHAR}]+")


def bytes_to_byte_level(data: bytes) -> str:
    """Map raw bytes to the byte-level alphabet the backend Unigram vocabulary is written in."""
    return codecs.charmap_decode(data, "strict", BYTE_TO_CHAR)[0]


def byte_level_to_bytes(text: str) -> bytes:
    """Inverse of :func:`bytes_to_byte_level`.

    Raises:
        ValueError: if ``text`` holds a character outside the byte-level alphabet.
    """
    try:
        return bytes(CHAR_TO_BYTE[c] for c in text)
    except KeyError as err:
        raise ValueError(f"{text!r} is not byte-level text: {err.args[0]!r} is not one of its 256 characters") from None


def _nfc_utf8(texts: Sequence[str]) -> list[bytes]:
    """``[_utf8(nfc(text)) for text in texts]``, with the common case (short valid text) inlined."""
    normalize = unicodedata.normalize
    try:
        return [normalize("NFC", t).encode() if len(t) <= _NFC_BLOCK else nfc(t).encode() for t in texts]
    except UnicodeEncodeError:  # a lone surrogate: let _utf8 name it
        return [_utf8(nfc(text)) for text in texts]


def _utf8(text: str) -> bytes:
    """``text.encode()`` with a clear error for lone surrogates (which UTF-8 cannot represent)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"text contains a lone surrogate {text[err.start]!r} at index {err.start}; BytePiece segments UTF-8 "
            "bytes and UTF-8 cannot encode surrogates. Repair the text first, e.g. "
            "text.encode('utf-16', 'surrogatepass').decode('utf-16', 'replace')."
        ) from None


def nfc(text: str) -> str:
    """``unicodedata.normalize("NFC", text)``, computed line block by line block for long texts.

    CPython normalises (and ``is_normalized`` checks) a whole string slowly as soon as one character fails its quick
    check (a 4.5 MB text with a few such characters: ~0.17 s instead of ~0.01 s). A newline is never composed or reordered with its neighbours, so
    normalising blocks cut just after a newline gives the same string.
    """
    if len(text) <= _NFC_BLOCK:
        return unicodedata.normalize("NFC", text)
    blocks, start = [], 0
    while start < len(text):
        cut = text.find("\n", start + _NFC_BLOCK)
        cut = len(text) if cut < 0 else cut + 1
        blocks.append(unicodedata.normalize("NFC", text[start:cut]))
        start = cut
    return "".join(blocks)


def bytepiece_chunks(text: str) -> list[bytes]:
    """The reference's deterministic pre-tokenisation: NFC, then one chunk per line (with its trailing newlines).

    This is ``bytepiece.normalize(text)``; each chunk is segmented independently, so a token never spans two chunks.

    Args:
        text: any valid Unicode text.

    Returns:
        The UTF-8 bytes of each chunk, in order; ``b"".join(chunks) == NFC(text).encode()``.

    Raises:
        TypeError: if ``text`` is not a ``str``.
        ValueError: if ``text`` contains a lone surrogate.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return [_utf8(chunk) for chunk in _CHUNK_RE.findall(nfc(text))]


def _byte_level_chunks(text: str) -> list[str]:
    """:func:`bytepiece_chunks`, already mapped to byte-level text (the backend model's input), in one pass."""
    return _MAPPED_CHUNK_RE.findall(bytes_to_byte_level(_utf8(nfc(text))))


# Below this many bytes a batch is segmented on the calling thread: starting threads would cost more than it saves.
_PARALLEL_MIN_BYTES = 1 << 16
# Work items per thread, so a thread that finishes early takes more and list building overlaps segmentation.
_ITEMS_PER_THREAD = 4
# Sampling cuts texts into items of this size, each with its own seed (independent of the thread count).
_SAMPLE_ITEM_BYTES = 1 << 16


def c_segmenter(pieces: Sequence[bytes], scores: Sequence[float], first_id: int = NUM_RESERVED) -> Any | None:
    """The C ``Segmenter`` of a vocabulary (piece ``i`` gets id ``first_id + i``), or None when it is not built.

    Its ``encode(texts, lines=True)`` gives the ids of the best segmentation of each UTF-8 text, line by line like
    BytePiece, with the reference's tie rule; it releases the GIL (see :func:`segment_in_threads`).
    """
    if _viterbi is None:
        return None
    return _viterbi.Segmenter(list(pieces), [float(s) for s in scores], first_id)


def encode_threads() -> int:
    """Threads for batch encoding, following the ``tokenizers`` library's settings.

    One when ``TOKENIZERS_PARALLELISM`` is off (``false``/``0``/``no``/``off``), else ``RAYON_NUM_THREADS`` when
    set, else every core this process may run on.
    """
    if os.environ.get("TOKENIZERS_PARALLELISM", "").strip().lower() in ("false", "0", "no", "off"):
        return 1
    rayon = os.environ.get("RAYON_NUM_THREADS", "").strip()
    if rayon.isdigit() and int(rayon) > 0:
        return int(rayon)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def split_at_chunk_boundaries(data: bytes, size: int) -> list[bytes]:
    """Cut UTF-8 text into parts of about ``size`` bytes, only where one chunk ends and the next begins.

    Chunks (see :func:`bytepiece_chunks`) are segmented independently, so the ids of the parts, concatenated, are the
    ids of ``data``. A chunk longer than ``size`` stays whole.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    parts, start = [], 0
    while len(data) - start > size:
        cut = data.find(b"\n", start + size)
        if cut < 0:
            break
        cut += 1
        while cut < len(data) and data[cut] == 0x0A:  # a chunk takes the whole run of newlines
            cut += 1
        parts.append(data[start:cut])
        start = cut
    if start < len(data) or not parts:
        parts.append(data[start:])
    return parts


def _cut(texts: Sequence[bytes], size: int, lines: bool) -> tuple[list[bytes], list[int] | None]:
    """Texts as items of at most about ``size`` bytes (cut at chunk boundaries if ``lines``), with each item's text
    (None when no text was cut)."""
    if not lines or not texts or max(map(len, texts)) <= size:
        return list(texts), None
    items: list[bytes] = []
    owner: list[int] = []
    for index, text in enumerate(texts):
        parts = split_at_chunk_boundaries(text, size) if len(text) > size else [text]
        items += parts
        owner += [index] * len(parts)
    return items, owner


def _joined(owner: list[int] | None, segmented: list[list[int]]) -> list[list[int]]:
    """The ids of each text from the ids of its items (see :func:`_cut`)."""
    if owner is None:
        return segmented
    out: list[list[int]] = []
    for index, (text_index, ids) in enumerate(zip(owner, segmented)):
        if index and owner[index - 1] == text_index:
            out[-1] += ids
        else:
            out.append(ids)
    return out


def _in_threads(run: Any, items: list[bytes], threads: int) -> list[list[int]]:
    """``run(start, stop)`` (the ids of ``items[start:stop]``) over contiguous groups of about equal bytes, on
    ``threads`` threads taking groups as they finish. Threads are started per call, so this stays safe in processes
    forked later (``datasets.map(num_proc=...)``, ``DataLoader`` workers)."""
    total = sum(map(len, items))
    if threads <= 1 or total < _PARALLEL_MIN_BYTES or len(items) < 2:
        return run(0, len(items))
    share = -(-total // (threads * _ITEMS_PER_THREAD))
    bounds, filled = [0], 0
    for stop, item in enumerate(items, 1):
        filled += len(item)
        if filled >= share or stop == len(items):
            bounds.append(stop)
            filled = 0
    with ThreadPoolExecutor(max_workers=min(threads, len(bounds) - 1)) as pool:
        groups = pool.map(run, bounds[:-1], bounds[1:])
        return [ids for group in groups for ids in group]


def segment_in_threads(
    segmenter: Any, texts: Sequence[bytes], threads: int | None = None, lines: bool = True
) -> list[list[int]]:
    """Ids of each UTF-8 text by a C ``Segmenter``, on ``threads`` threads (default :func:`encode_threads`).

    Texts are grouped (and, with ``lines``, long ones cut at chunk boundaries) into about ``threads * 4`` items of
    equal size; the segmenter releases the GIL while it works. ``lines=False`` segments each text whole (see
    ``Segmenter.encode``).
    """
    threads = encode_threads() if threads is None else threads
    total = sum(map(len, texts))
    if threads <= 1 or total < _PARALLEL_MIN_BYTES:
        return segmenter.encode(list(texts), lines=lines)
    items, owner = _cut(texts, -(-total // (threads * _ITEMS_PER_THREAD)), lines)
    return _joined(owner, _in_threads(lambda a, b: segmenter.encode(items[a:b], lines=lines), items, threads))


def sample_in_threads(
    segmenter: Any, texts: Sequence[bytes], alpha: float, rng: np.random.Generator, threads: int | None = None
) -> list[list[int]]:
    """Sampled ids of each UTF-8 text by a C ``Segmenter`` (``Segmenter.sample``), on ``threads`` threads.

    Texts are cut at chunk boundaries into items of at most about ``_SAMPLE_ITEM_BYTES`` and every item gets a seed
    drawn from ``rng``, so the result depends on ``rng`` only, not on the number of threads.
    """
    threads = encode_threads() if threads is None else threads
    items, owner = _cut(texts, _SAMPLE_ITEM_BYTES, lines=True)
    seeds = rng.integers(0, 2**64, size=len(items), dtype=np.uint64).tolist()
    return _joined(owner, _in_threads(lambda a, b: segmenter.sample(items[a:b], alpha, seeds[a:b]), items, threads))


# ----------------------------------------------------------------------------------------------------------------
# Model file IO


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"BytePiece model: duplicate key {key!r}")
        seen[key] = value
    return seen


def read_bytepiece_model(model: str | os.PathLike | Mapping[str, Any]) -> tuple[list[bytes], list[int]]:
    """Read and validate a reference BytePiece model.

    Args:
        model: path of a model file, or the parsed JSON object ``{base64(piece): [id, text, count]}``.

    Returns:
        ``(pieces, counts)`` in id order: ``pieces[i]`` has token id ``i + 3``.

    Raises:
        ValueError: the file is not JSON, a key is not base64, an entry is malformed, a piece or id is duplicated,
            ids are missing, a single-byte piece is missing, or there are fewer than 256 pieces.
        TypeError: ``model`` is neither a path nor a mapping.
    """
    if isinstance(model, (str, os.PathLike)):
        source = os.fspath(model)
        try:
            with open(source, encoding="utf-8") as f:
                raw = json.load(f, object_pairs_hook=_reject_duplicate_keys)
        except UnicodeDecodeError as err:
            raise ValueError(f"{source} is not a BytePiece model: not UTF-8 text ({err})") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{source} is not a BytePiece model: not valid JSON ({err})") from None
    elif isinstance(model, Mapping):
        source, raw = "BytePiece model", model
    else:
        raise TypeError(f"model must be a path or a dict, got {type(model).__name__}")
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"{source}: expected a JSON object {{base64(piece): [id, text, count]}}, got {type(raw).__name__}"
        )

    by_id: dict[int, tuple[bytes, int]] = {}
    seen_pieces: dict[bytes, str] = {}
    for key, entry in raw.items():
        if not isinstance(key, str):
            raise ValueError(f"{source}: keys must be base64 strings, got {key!r}")
        try:
            piece = base64.b64decode(key, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{source}: key {key!r} is not valid base64") from None
        if not piece:
            raise ValueError(f"{source}: key {key!r} decodes to an empty piece")
        if piece in seen_pieces:
            raise ValueError(f"{source}: keys {seen_pieces[piece]!r} and {key!r} are the same piece {piece!r}")
        seen_pieces[piece] = key
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
            raise ValueError(f"{source}: entry of {key!r} must be [id, text, count], got {entry!r}")
        token_id, count = entry[0], entry[2]
        if not isinstance(token_id, int) or isinstance(token_id, bool):
            raise ValueError(f"{source}: id of {key!r} must be an integer, got {token_id!r}")
        if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
            raise ValueError(f"{source}: count of {key!r} must be a positive integer, got {count!r}")
        if token_id in by_id:
            raise ValueError(f"{source}: duplicate id {token_id} ({by_id[token_id][0]!r} and {piece!r})")
        by_id[token_id] = (piece, count)

    if len(by_id) < 256:
        raise ValueError(
            f"{source}: vocabulary too small: {len(by_id)} pieces, but every one of the 256 single bytes must be a piece"
        )
    expected = range(NUM_RESERVED, NUM_RESERVED + len(by_id))
    if set(by_id) != set(expected):
        missing = sorted(set(expected) - set(by_id))[:10]
        outside = sorted(set(by_id) - set(expected))[:10]
        raise ValueError(
            f"{source}: ids must be exactly {expected.start}..{expected.stop - 1} (0-2 are reserved); "
            f"missing {missing}, unexpected {outside}"
        )
    pieces = [by_id[i][0] for i in expected]
    missing_bytes = sorted(set(range(256)) - {p[0] for p in pieces if len(p) == 1})
    if missing_bytes:
        shown = ", ".join(f"0x{b:02X}" for b in missing_bytes[:16])
        raise ValueError(
            f"{source}: {len(missing_bytes)} single-byte pieces are missing ({shown}); all 256 are required"
        )
    return pieces, [by_id[i][1] for i in expected]


def bytepiece_model_dict(counts: Mapping[bytes, int]) -> dict[str, list]:
    """The reference JSON object for pieces with counts: sorted by ``(len, bytes)``, ids from 3."""
    ordered = sorted(counts.items(), key=lambda item: (len(item[0]), item[0]))
    return {
        base64.b64encode(piece).decode(): [i + NUM_RESERVED, piece.decode(errors="ignore"), int(count)]
        for i, (piece, count) in enumerate(ordered)
    }


def write_bytepiece_model(counts: Mapping[bytes, int], path: str | os.PathLike) -> str:
    """Write pieces with counts in the reference file format (same JSON layout as ``bytepiece.Trainer.save``)."""
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(bytepiece_model_dict(counts), f, indent=4, ensure_ascii=False)
    return path


def log_probs(counts: Sequence[int]) -> np.ndarray:
    """Piece scores exactly as the reference computes them: ``np.log(count) - np.log(sum(counts))`` in float64."""
    return np.log(np.asarray(counts, dtype=np.int64)) - np.log(sum(int(c) for c in counts))


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer


def json_float(x: float) -> str:
    """A JSON number that both Python and ``tokenizers`` read back as exactly ``x``.

    ``tokenizers`` parses JSON with serde_json's default float parser, which computes ``float(digits) / 10**k`` and
    is off by one ulp for about one in eight shortest-repr scores. Viterbi ties between permutations of the same
    pieces (``"}}}"`` as ``}|}}`` or ``}}|}``) are decided by the last bit of float sums, so a one-ulp error changes
    ids. When the shortest repr has more than 53 bits of digits, look for an exactly representable integer ``D``
    and a power ``k`` with ``D / 10**k == |x|`` (one correctly rounded division in both parsers). Falls back to the
    shortest repr (exact for Python, possibly one ulp off for serde_json) when no such pair exists.
    """
    text = repr(float(x))
    if not math.isfinite(x):
        raise ValueError(f"score {x} is not finite")
    if "e" not in text and int(text.lstrip("-").replace(".", "")) < 2**53:
        return text
    magnitude = abs(x)
    for k in range(1, 23):  # 10**k is an exact double up to k = 22
        candidate = float(Fraction(magnitude) * 10**k)
        neighbours = [candidate]
        up = down = candidate
        for _ in range(4):
            up, down = math.nextafter(up, math.inf), math.nextafter(down, 0.0)
            neighbours += [up, down]
        for d in neighbours:
            if d < 2.0**64 and d == int(d) and d / 10.0**k == magnitude:
                digits = str(int(d)).rjust(k + 1, "0")
                return ("-" if x < 0 else "") + digits[:-k] + "." + digits[-k:]
    return text


def _unigram_vocab_json(vocab: Sequence[tuple[str, float]]) -> str:
    return (
        "[" + ",".join(f"[{json.dumps(name, ensure_ascii=False)},{json_float(score)}]" for name, score in vocab) + "]"
    )


def _normalizer() -> normalizers.Normalizer:
    return normalizers.NFC()


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CHUNK_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _decoder() -> decoders.Decoder:
    return decoders.ByteLevel()


def _unigram_vocab(pieces: Sequence[bytes], scores: Iterable[float]) -> list[tuple[str, float]]:
    vocab = [(name, _RESERVED_SCORE) for name in RESERVED_TOKENS]
    return vocab + [(bytes_to_byte_level(p), float(s)) for p, s in zip(pieces, scores, strict=True)]


def _unigram(vocab: Sequence[tuple[str, float]]) -> models.Unigram:
    return models.Unigram(list(vocab), unk_id=None, byte_fallback=False)


def _pipeline(model: models.Unigram) -> Tokenizer:
    backend = Tokenizer(model)
    backend.normalizer = _normalizer()
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = _decoder()
    return backend


def _check_pipeline(backend: Tokenizer) -> None:
    """Refuse a ``tokenizers`` object that is not a BytePiece pipeline."""
    if not isinstance(backend.model, models.Unigram):
        raise ValueError(f"not a BytePiece tokenizer: the model is {type(backend.model).__name__}, not Unigram")
    expected = {"normalizer": _normalizer(), "pre_tokenizer": _pre_tokenizer(), "decoder": _decoder()}
    for part, want in expected.items():
        got = getattr(backend, part)
        if got is None or json.loads(got.__getstate__()) != json.loads(want.__getstate__()):
            raise ValueError(f"not a BytePiece tokenizer: its {part} differs from the BytePiece pipeline")


@dataclass(frozen=True)
class BytePieceVocab:
    """A BytePiece vocabulary in the reference's terms, for code that segments bytes itself (e.g. sampling).

    Attributes:
        pieces: the byte string of every piece in id order; ``pieces[i]`` is token id ``i + first_id``.
        log_probs: float64 ``log(count / total)`` of each piece, the exact Viterbi scores of the reference.
        piece_to_id: piece bytes -> token id.
        first_id: id of ``pieces[0]`` (ids below it are ``<pad>``, ``<bos>``, ``<eos>``).
    """

    pieces: tuple[bytes, ...]
    log_probs: np.ndarray
    piece_to_id: dict[bytes, int]
    first_id: int = NUM_RESERVED

    @property
    def vocab_size(self) -> int:
        return len(self.pieces) + self.first_id


class BytePieceTokenizerFast(PreTrainedTokenizerFast):
    """A BytePiece model as a transformers fast tokenizer; ids are identical to the reference package's.

    Build one from a reference model file with :meth:`from_bytepiece`; ``save_pretrained`` writes a plain
    ``PreTrainedTokenizerFast`` directory that ``AutoTokenizer.from_pretrained`` loads without hf_su.

    Special tokens: ids 0/1/2 are ``<pad>``/``<bos>``/``<eos>`` (the reference's reserved ids) and are this
    tokenizer's ``pad_token``/``bos_token``/``eos_token``. ``add_special_tokens=True`` (the transformers default)
    adds ``<bos>`` in front and/or ``<eos>`` at the end only if the tokenizer was built with ``add_bos_token=True`` /
    ``add_eos_token=True`` (both off by default, as ``bytepiece.Tokenizer.encode``'s ``add_bos``/``add_eos``).
    The literal text ``"<eos>"`` is encoded as ordinary bytes, like the reference does (``split_special_tokens=True``);
    pass ``split_special_tokens=False`` to map those strings to the reserved ids instead.

    Decoding: ``decode(encode(text)) == unicodedata.normalize("NFC", text)``. A sequence whose bytes are not valid
    UTF-8 on its own (a truncated or sampled segmentation that splits a character) decodes each invalid run to
    U+FFFD, like ``bytes.decode(errors="replace")``; the reference drops such bytes instead, which is
    ``tok.decode_bytes(ids).decode(errors="ignore")``.

    Speed: plain encoding (no offsets, overflow, pairs or truncation requested) segments the texts with the C
    segmenter on :func:`encode_threads` threads (or, when it is not built, one parallel ``encode_batch_fast`` call
    of the backend Unigram model); the result is the same ``input_ids``/``attention_mask`` the full pipeline gives
    (``BatchEncoding.encodings`` is then ``None``). Requests that need the full pipeline
    (``return_offsets_mapping=True``, truncation, ...) use it.
    """

    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "right"

    def __init__(self, vocab: Sequence[tuple[str, float]] | None = None, **kwargs: Any) -> None:
        """Build the tokenizer from its backend Unigram vocabulary (``from_pretrained`` calls this).

        Args:
            vocab: ``[(byte-level piece, score), ...]`` in id order, reserved ids first (what ``from_pretrained``
                reads from ``tokenizer.json``). Use :meth:`from_bytepiece` for a reference model file;
                ``tokenizer_object=`` / ``tokenizer_file=`` holding a BytePiece pipeline also work.
            **kwargs: the usual ``PreTrainedTokenizerFast`` arguments (``add_bos_token``, ``model_max_length``, ...).

        Raises:
            ValueError: the vocabulary or pipeline is not a BytePiece one.
        """
        for name, token in zip(("pad_token", "bos_token", "eos_token"), RESERVED_TOKENS, strict=True):
            kwargs.setdefault(name, token)
        kwargs.setdefault("split_special_tokens", True)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        source = kwargs.pop("tokenizer_object", None)
        source_file = kwargs.pop("tokenizer_file", None)
        if vocab is None:
            if source is None and source_file is not None and os.path.isfile(source_file):
                source = Tokenizer.from_file(source_file)
            if source is None:
                raise ValueError(
                    "BytePieceTokenizerFast needs a vocabulary: use from_bytepiece(path) or from_pretrained(dir)"
                )
            _check_pipeline(source)
            kwargs.setdefault("post_processor", source.post_processor)
            # Python re-parses the shortest-repr JSON exactly; Rust's parse may be one ulp off (see json_float).
            vocab = json.loads(source.model.__getstate__())["vocab"]
        # Exact float scores; the backend is (re)built from them so no JSON parser stands in between.
        self._unigram_vocab = [(str(name), float(score)) for name, score in vocab]
        self._vocab_cache = self._validated_vocab()
        self._tokenizer = _pipeline(_unigram(self._unigram_vocab))
        self._segmenter = None  # the C segmenter, built on first use
        super().__init__(**kwargs)

    def _validated_vocab(self) -> BytePieceVocab:
        names = [name for name, _ in self._unigram_vocab]
        if tuple(names[:NUM_RESERVED]) != RESERVED_TOKENS:
            raise ValueError(
                f"not a BytePiece vocabulary: ids 0-2 must be {RESERVED_TOKENS}, got {names[:NUM_RESERVED]}"
            )
        pieces = tuple(byte_level_to_bytes(name) for name in names[NUM_RESERVED:])
        piece_to_id = {p: i + NUM_RESERVED for i, p in enumerate(pieces)}
        if len(piece_to_id) != len(pieces):
            raise ValueError("not a BytePiece vocabulary: duplicate pieces")
        missing = [b for b in range(256) if bytes([b]) not in piece_to_id]
        if missing:
            raise ValueError(f"not a BytePiece vocabulary: {len(missing)} single-byte pieces are missing")
        scores = np.array([score for _, score in self._unigram_vocab[NUM_RESERVED:]], dtype=np.float64)
        return BytePieceVocab(pieces=pieces, log_probs=scores, piece_to_id=piece_to_id)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_segmenter": None}  # the C segmenter cannot be pickled; it is rebuilt on use

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Pickling (datasets.map(num_proc=...), copy.deepcopy) round-trips the backend through Rust's JSON parser.
        self.__dict__.update(state)
        self._segmenter = None
        self._tokenizer.model = _unigram(self._unigram_vocab)

    @classmethod
    def from_bytepiece(cls, model: str | os.PathLike | Mapping[str, Any], **kwargs: Any) -> BytePieceTokenizerFast:
        """Build the tokenizer of a reference BytePiece model.

        Args:
            model: path of a reference model file (``*.model``, JSON) or its parsed JSON object.
            **kwargs: passed to the tokenizer, e.g. ``add_bos_token=True``, ``add_eos_token=True``,
                ``model_max_length=4096``, ``padding_side="left"``, ``split_special_tokens=False``.

        Returns:
            The tokenizer; ``tok(text)["input_ids"] == bytepiece.Tokenizer(model).encode(text)``.

        Raises:
            ValueError: the model file is invalid (see :func:`read_bytepiece_model`).
        """
        pieces, counts = read_bytepiece_model(model)
        return cls(vocab=_unigram_vocab(pieces, log_probs(counts)), **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> tuple[str, ...]:
        """Save as a plain ``PreTrainedTokenizerFast`` directory that ``AutoTokenizer`` loads without hf_su.

        The scores in ``tokenizer.json`` are written so that ``tokenizers``' own JSON parser reads them back exactly
        (see :func:`json_float`); otherwise a reload could break Viterbi ties differently from the reference.
        """
        files = super().save_pretrained(save_directory, *args, **kwargs)
        for path in files:
            name = os.path.basename(path)
            if name.endswith("tokenizer_config.json"):
                with open(path, encoding="utf-8") as f:
                    config = json.load(f)
                config["tokenizer_class"] = "PreTrainedTokenizerFast"
                with open(path, "w", encoding="utf-8") as f:
                    f.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
            elif name.endswith("tokenizer.json"):
                with open(path, encoding="utf-8") as f:
                    state = json.load(f)
                placeholder = "@@BYTEPIECE_VOCAB@@"
                state["model"]["vocab"] = placeholder
                text = json.dumps(state, indent=2, ensure_ascii=False)
                text = text.replace(json.dumps(placeholder), _unigram_vocab_json(self._unigram_vocab), 1)
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
        return files

    # --- vocabulary access for other modules ----------------------------------------------------------------------

    def bytepiece_vocab(self) -> BytePieceVocab:
        """The pieces as bytes with their exact reference log-prob scores (see :class:`BytePieceVocab`)."""
        return self._vocab_cache

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = True) -> bytes:
        """Concatenated piece bytes of ``ids`` (the reserved ids are skipped, or spelled out when not skipping).

        ``tok.decode_bytes(ids).decode(errors="ignore")`` is the reference's ``Tokenizer.decode(ids)``.

        Raises:
            ValueError: if an id is outside the vocabulary.
        """
        vocab = self.bytepiece_vocab()
        out = []
        for token_id in ids:
            token_id = int(token_id)
            if 0 <= token_id < NUM_RESERVED:
                if not skip_special_tokens:
                    out.append(RESERVED_TOKENS[token_id].encode())
            elif NUM_RESERVED <= token_id < vocab.vocab_size:
                out.append(vocab.pieces[token_id - NUM_RESERVED])
            else:
                raise ValueError(f"token id {token_id} is outside the vocabulary (size {vocab.vocab_size})")
        return b"".join(out)

    def encode_sampled(
        self, texts: str | list[str], alpha: float = 0.1, seed: int | None = None
    ) -> list[int] | list[list[int]]:
        """Random segmentations by BytePiece's exact Viterbi sampling (see ``hf_su.tokenization.sampling``).

        Args:
            texts: one text (gives ``list[int]``) or a list of texts (gives ``list[list[int]]``).
            alpha: inverse temperature of the sampling law ``P(segmentation) ∝ prod p(piece)^alpha``.
            seed: seed for reproducible samples.
        """
        from .sampling import encode_sampled

        return encode_sampled(self, texts, alpha=alpha, seed=seed)

    # --- encoding -------------------------------------------------------------------------------------------------

    def _c_segmenter(self) -> Any | None:
        if self._segmenter is None and _viterbi is not None:
            vocab = self._vocab_cache
            self._segmenter = c_segmenter(vocab.pieces, vocab.log_probs.tolist(), vocab.first_id)
        return self._segmenter if _viterbi is not None else None

    def _raw_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text without special tokens (the deterministic segmentation, using every core)."""
        segmenter = self._c_segmenter()
        if segmenter is None:
            return self._backend_raw_ids(texts)
        return segment_in_threads(segmenter, _nfc_utf8(texts))

    def _sampled_raw_ids(self, texts: Sequence[str], alpha: float, rng: np.random.Generator) -> list[list[int]] | None:
        """Sampled ids of each text without special tokens (see ``hf_su.tokenization.sampling``) through the C
        segmenter, or None when it is not built or the text may hold added tokens that must stay whole."""
        segmenter = self._c_segmenter()
        if segmenter is None or not self._plain_text_only(self.split_special_tokens):
            return None
        return sample_in_threads(segmenter, _nfc_utf8(texts), alpha, rng)

    def _backend_raw_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`_raw_ids` through the backend Unigram model (used when the C segmenter is not built)."""
        words: list[str] = []
        bounds = [0]
        for text in texts:
            words.extend(_byte_level_chunks(text))
            bounds.append(len(words))
        encodings = Tokenizer(self._tokenizer.model).encode_batch_fast(words, add_special_tokens=False)
        out = []
        for start, stop in zip(bounds, bounds[1:]):
            if stop - start == 1:  # most texts are one chunk: take its list as is
                out.append(encodings[start].ids)
                continue
            ids: list[int] = []
            for encoding in encodings[start:stop]:
                ids += encoding.ids
            out.append(ids)
        return out

    def _special_affixes(self, add_special_tokens: bool) -> tuple[list[int], list[int]] | None:
        """Ids the post-processor puts before and after a single sequence; None if it is not a template."""
        processor = self._tokenizer.post_processor
        if not add_special_tokens or processor is None:
            return [], []
        state = json.loads(processor.__getstate__())
        if state.get("type") != "TemplateProcessing":
            return None
        affixes: tuple[list[int], list[int]] = ([], [])
        side = 0
        for item in state["single"]:
            if "Sequence" in item:
                side += 1
            else:
                affixes[min(side, 1)].extend(state["special_tokens"][item["SpecialToken"]["id"]]["ids"])
        return affixes if side == 1 else None

    def _encode_plus(self, text: Any, text_pair: Any = None, **kwargs: Any) -> BatchEncoding:
        batched = isinstance(text, (list, tuple))
        texts = text if batched else [text]
        affixes = self._fast_path_affixes(texts, text_pair, kwargs)
        if affixes is None:
            for item in (*texts, *(text_pair if isinstance(text_pair, (list, tuple)) else [text_pair])):
                if isinstance(item, str):
                    _utf8(item)  # a clear error for lone surrogates instead of the backend's "must be str"
            return super()._encode_plus(text, text_pair=text_pair, **kwargs)
        prefix, suffix = affixes
        input_ids = self._raw_ids(texts)
        if prefix or suffix:
            input_ids = [prefix + ids + suffix for ids in input_ids]
        max_length = kwargs.get("max_length")
        if input_ids:  # the warning depends only on the longest sequence
            longest = max(input_ids, key=len)
            self._eventual_warn_about_too_long_sequence(longest, max_length, kwargs.get("verbose", True))
        return_tensors = kwargs.get("return_tensors")
        padding = kwargs.get("padding_strategy", False)
        if padding in (False, None, PaddingStrategy.DO_NOT_PAD):  # what pad() would build, without its per-row loop
            return_attention_mask = kwargs.get("return_attention_mask")
            if return_attention_mask is None:
                return_attention_mask = "attention_mask" in self.model_input_names
            data: dict[str, Any] = {"input_ids": input_ids}
            if return_attention_mask:
                data["attention_mask"] = [[1] * len(ids) for ids in input_ids]
            if not (batched or return_tensors):
                data = {key: rows[0] for key, rows in data.items()}
            return BatchEncoding(data, tensor_type=return_tensors)
        return self.pad(
            {"input_ids": input_ids if batched or return_tensors else input_ids[0]},
            padding=padding,
            max_length=max_length,
            pad_to_multiple_of=kwargs.get("pad_to_multiple_of"),
            padding_side=kwargs.get("padding_side"),
            return_attention_mask=kwargs.get("return_attention_mask"),
            return_tensors=return_tensors,
            verbose=kwargs.get("verbose", True),
        )

    def _fast_path_affixes(
        self, texts: Sequence[Any], text_pair: Any, kwargs: dict[str, Any]
    ) -> tuple[list[int], list[int]] | None:
        """Special-token affixes if this request can skip the full pipeline (same ids, no per-token extras)."""
        wants_extras = any(
            kwargs.get(name)
            for name in (
                "is_split_into_words",
                "return_offsets_mapping",
                "return_overflowing_tokens",
                "return_special_tokens_mask",
                "return_length",
                "return_token_type_ids",
                "sanitize_control_tokens",
            )
        )
        truncation = kwargs.get("truncation_strategy", TruncationStrategy.DO_NOT_TRUNCATE)
        split_special = kwargs.get("split_special_tokens")
        split_special = self.split_special_tokens if split_special is None else split_special
        if (
            wants_extras
            or text_pair is not None
            or truncation != TruncationStrategy.DO_NOT_TRUNCATE
            or not self._plain_text_only(split_special)
            or not all(isinstance(t, str) for t in texts)
        ):
            return None
        return self._special_affixes(kwargs.get("add_special_tokens", True))

    def _plain_text_only(self, split_special_tokens: bool) -> bool:
        """Whether all text is segmented as bytes: special tokens are split and no other tokens were added."""
        return split_special_tokens and all(token.special for token in self.added_tokens_decoder.values())


def load_tokenizer(path: str | os.PathLike, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(path, **kwargs)``, except that BytePiece comes back as
    :class:`BytePieceTokenizerFast`, whose plain encoding runs in the C segmenter.

    ``save_pretrained`` writes a BytePiece tokenizer as a plain ``PreTrainedTokenizerFast`` directory so that
    transformers loads it without hf_su; ``AutoTokenizer`` then encodes through the ``tokenizers`` pipeline (same ids,
    several times slower). This loader recognises that pipeline in ``tokenizer.json`` and loads the directory as
    :class:`BytePieceTokenizerFast` instead (saved settings such as ``add_bos_token`` or ``padding_side`` kept).

    Args:
        path: a tokenizer directory, a reference BytePiece model file (``*.model``), or a hub id.
        **kwargs: passed to ``from_pretrained`` (or ``from_bytepiece`` for a model file).

    Returns:
        The tokenizer.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return BytePieceTokenizerFast.from_bytepiece(path, **kwargs)
    tokenizer_file = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tokenizer_file):
        try:
            _check_pipeline(Tokenizer.from_file(tokenizer_file))
        except ValueError:  # another tokenizer (or an unreadable file, which AutoTokenizer reports below)
            pass
        else:
            return BytePieceTokenizerFast.from_pretrained(path, **kwargs)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, **kwargs)
