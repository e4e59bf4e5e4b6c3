"""Continuation fix for prompts that end inside a token ("token healing"), exact and batched.

With a large vocabulary, a prompt such as ``"北京是中国的首"`` ends in the middle of what the model always saw as one token
(``"首都"``): the prompt's tokenisation never occurred in training and continuations degrade. Su's fix
(kexue.fm/archives/9762): back off the trailing prompt token(s), run the model on the shortened prompt, restrict the
next-token distribution to the tokens whose text is consistent with the removed text, renormalise, and continue.

This module does that exactly (a hard mask, so greedy picks and sampling draws follow the model's conditional
distribution restricted to consistent tokens) and in one ``generate`` call for a left-padded batch whose rows back off
different amounts:

1. :func:`token_bytes` gives each token id its bytes (byte-level BPE, byte-level Unigram/BytePiece, SentencePiece with
   ``▁`` and ``<0xNN>`` byte-fallback pieces), built once per tokenizer and cached, with a sorted index so the tokens
   starting with a given byte string are one binary search away.
2. :func:`back_off` picks how many trailing tokens to remove: the largest ``k <= max_backoff_tokens`` whose text is
   a proper prefix of a longer vocabulary token (no such ``k``: the prompt is left alone).
3. :class:`HealingLogitsProcessor` masks, at each step, every token that is not byte-consistent with the removed bytes
   still to be regenerated, until they are consumed; later steps are untouched.
"""

from __future__ import annotations

import bisect
import json
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = ["HealingLogitsProcessor", "TokenBytes", "back_off", "generate_healed", "token_bytes"]


# ---------------------------------------------------------------------------------------------------------------------
# Byte view of a vocabulary


def _unicode_to_byte() -> dict[str, int]:
    """Inverse of the GPT-2 byte-to-unicode table used by byte-level pre-tokenizers (ByteLevel)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


_UNICODE_TO_BYTE = _unicode_to_byte()


def _byte_level_bytes(token: str) -> bytes:
    # A character outside the table is kept as its UTF-8 bytes, as tokenizers' ByteLevel decoder does.
    return b"".join(bytes([_UNICODE_TO_BYTE[c]]) if c in _UNICODE_TO_BYTE else c.encode("utf-8") for c in token)


def _byte_fallback_value(token: str) -> int | None:
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return int(token[3:5], 16)
        except ValueError:
            return None
    return None


def _flatten_decoders(spec: dict[str, Any] | None) -> list[dict[str, Any]]:
    if spec is None:
        return []
    if spec.get("type") == "Sequence":
        return [d for child in spec.get("decoders", []) for d in _flatten_decoders(child)]
    return [spec]


@dataclass(eq=False)
class TokenBytes:
    """The bytes of every token id of one tokenizer, with a sorted index for prefix queries.

    Attributes:
        pieces: ``pieces[i]`` is token ``i``'s bytes, or ``None`` for special tokens and ids without text (they are
            never allowed while healing and never backed off).
        family: ``"byte_level"`` or ``"sentencepiece"`` (how the bytes were derived).
    """

    pieces: list[bytes | None]
    family: str
    _sorted: list[bytes] = field(init=False, repr=False)
    _sorted_ids: torch.Tensor = field(init=False, repr=False)
    _exact: dict[bytes, list[int]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        order = sorted((p, i) for i, p in enumerate(self.pieces) if p)
        self._sorted = [p for p, _ in order]
        self._sorted_ids = torch.tensor([i for _, i in order], dtype=torch.long)
        self._exact = {}
        for p, i in order:
            self._exact.setdefault(p, []).append(i)

    def __len__(self) -> int:
        return len(self.pieces)

    def exact(self, piece: bytes) -> list[int]:
        """Ids whose bytes equal ``piece``."""
        return self._exact.get(piece, [])

    def _extension_range(self, prefix: bytes) -> tuple[int, int]:
        lo = bisect.bisect_left(self._sorted, prefix)
        stem = prefix.rstrip(b"\xff")
        # every string starting with `prefix` sorts below the next string of the same length
        hi = len(self._sorted) if not stem else bisect.bisect_left(self._sorted, stem[:-1] + bytes([stem[-1] + 1]))
        return lo, hi

    def extensions(self, prefix: bytes) -> torch.Tensor:
        """Ids whose bytes start with ``prefix`` (``prefix`` itself included), as a 1-D long tensor."""
        lo, hi = self._extension_range(prefix)
        return self._sorted_ids[lo:hi]

    def has_longer_extension(self, prefix: bytes) -> bool:
        """Whether some token's bytes start with ``prefix`` and are longer than it."""
        lo, hi = self._extension_range(prefix)
        return hi - lo > len(self.exact(prefix))


def _build_token_bytes(tokenizer: PreTrainedTokenizerBase) -> TokenBytes:
    backend = tokenizer.backend_tokenizer
    decoders = _flatten_decoders(json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else None)
    types = {d.get("type") for d in decoders}
    if "ByteLevel" in types:
        family, to_bytes = "byte_level", _byte_level_bytes
    elif types & {"Metaspace", "ByteFallback", "Replace"}:
        space = next((d["replacement"] for d in decoders if d.get("type") == "Metaspace"), None)
        space = space or next(
            (d["pattern"].get("String") for d in decoders if d.get("type") == "Replace" and d.get("content") == " "),
            None,
        )
        if not space:
            raise ValueError(
                f"cannot derive token bytes: SentencePiece-style decoder {sorted(types)} has no Metaspace or "
                "Replace(<space symbol>, ' ') step"
            )
        byte_fallback = "ByteFallback" in types or bool(json.loads(backend.model.__getstate__()).get("byte_fallback"))

        def to_bytes(token: str) -> bytes:
            value = _byte_fallback_value(token) if byte_fallback else None
            return bytes([value]) if value is not None else token.replace(space, " ").encode("utf-8")

        family = "sentencepiece"
    else:
        raise ValueError(
            "cannot derive the bytes of each token: token healing supports byte-level vocabularies (ByteLevel "
            "decoder: GPT-2/Llama-3 BPE, BytePiece) and SentencePiece-style ones (Metaspace or Replace('▁') decoder, "
            f"optionally ByteFallback); this tokenizer's decoder is {sorted(t for t in types if t) or 'missing'}"
        )

    pieces: list[bytes | None] = [None] * len(tokenizer)
    for token, index in backend.get_vocab(with_added_tokens=False).items():
        if index < len(pieces):
            pieces[index] = to_bytes(token) or None
    # added tokens are matched on raw text, so their content is their text (not in the byte-level alphabet)
    for index, added in tokenizer.added_tokens_decoder.items():
        if index < len(pieces):
            pieces[index] = None if added.special else (added.content.encode("utf-8") or None)
    for index in tokenizer.all_special_ids:
        if index is not None and 0 <= index < len(pieces):
            pieces[index] = None
    return TokenBytes(pieces=pieces, family=family)


_TABLES: weakref.WeakKeyDictionary[Any, tuple[int, TokenBytes]] = weakref.WeakKeyDictionary()


def token_bytes(tokenizer: PreTrainedTokenizerBase) -> TokenBytes:
    """The cached :class:`TokenBytes` of ``tokenizer`` (rebuilt if tokens were added since).

    Raises:
        TypeError: ``tokenizer`` has no ``tokenizers`` backend.
        ValueError: the vocabulary has no byte or text view this module understands (e.g. WordPiece).
    """
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise TypeError(
            f"token healing needs a fast tokenizer (PreTrainedTokenizerFast with a `tokenizers` backend); got "
            f"{type(tokenizer).__name__}"
        )
    cached = _TABLES.get(tokenizer)
    if cached is None or cached[0] != len(tokenizer):
        cached = (len(tokenizer), _build_token_bytes(tokenizer))
        _TABLES[tokenizer] = cached
    return cached[1]


# ---------------------------------------------------------------------------------------------------------------------
# Back-off and the constrained states


def back_off(table: TokenBytes, ids: Sequence[int], max_backoff_tokens: int) -> int:
    """How many trailing tokens of ``ids`` to remove before healing.

    The largest ``k <= max_backoff_tokens`` such that the bytes of the last ``k`` tokens are a proper prefix of a longer
    vocabulary token; 0 if there is none. Special tokens are never removed and at least one token is always kept, so
    generation has a context.
    """
    best, tail = 0, b""
    for k in range(1, min(max_backoff_tokens, len(ids) - 1) + 1):
        index = ids[-k]
        piece = table.pieces[index] if 0 <= index < len(table) else None
        if piece is None:
            break
        tail = piece + tail
        if table.has_longer_extension(tail):
            best = k
    return best


class _Healing:
    """The constraint for one prompt: which tokens may follow after ``offset`` removed bytes were regenerated.

    At offset ``o`` the rest ``R[o:]`` must be matched: a token is allowed if it starts with ``R[o:]`` (it completes the
    healing) or is a proper prefix of ``R[o:]`` from whose end the healing can still be completed (a vocabulary without
    every single byte can otherwise walk into a dead end).
    """

    def __init__(self, table: TokenBytes, removed: bytes):
        self.table, self.removed = table, removed
        n = len(removed)
        completable = [False] * n + [True]
        for o in range(n - 1, -1, -1):
            rest = removed[o:]
            completable[o] = len(table.extensions(rest)) > 0 or any(
                completable[o + j] and table.exact(rest[:j]) for j in range(1, len(rest))
            )
        self._completable = completable
        self._allowed: dict[tuple[int, torch.device], torch.Tensor] = {}

    def offset_after(self, generated: Sequence[int]) -> int | None:
        """Removed bytes still to match after ``generated``: their offset in ``removed``, or ``None`` when done."""
        offset, n = 0, len(self.removed)
        for index in generated:
            if offset >= n:
                return None
            piece = self.table.pieces[index] if 0 <= index < len(self.table) else None
            if piece is None:
                return None
            rest = self.removed[offset:]
            if not (piece.startswith(rest) or rest.startswith(piece)):
                return None  # a token from outside the constraint (e.g. forced by the caller): stop healing
            offset += len(piece)
        return offset if offset < n else None

    def allowed(self, offset: int, device: torch.device) -> torch.Tensor:
        key = (offset, device)
        if key not in self._allowed:
            rest = self.removed[offset:]
            parts = [self.table.extensions(rest)]
            parts += [
                torch.tensor(self.table.exact(rest[:j]), dtype=torch.long)
                for j in range(1, len(rest))
                if self._completable[offset + j] and self.table.exact(rest[:j])
            ]
            self._allowed[key] = torch.cat(parts).to(device)
        return self._allowed[key]


class HealingLogitsProcessor(LogitsProcessor):
    """Hard-masks the next-token scores to tokens byte-consistent with each prompt's backed-off text.

    Row ``i`` of the batch (after ``generate`` expands prompts ``num_return_sequences`` or ``num_beams`` times) belongs
    to prompt ``i // expansion``. Its constrained steps last until the generated tokens have covered
    ``removed_bytes[prompt]``. The state is recomputed from ``input_ids`` at every call (no hidden state), so beam
    reordering and assisted decoding's candidate checks see the right constraint.
    Masked scores are ``-inf``, so softmax renormalises over the consistent tokens: greedy and sampling follow the
    model's distribution restricted to them (Su's rule at every constrained step).

    Put it last in ``logits_processor`` so no later processor revives a masked token; temperature/top-k/top-p
    warpers run after it inside ``generate``.

    Args:
        tokenizer: the fast tokenizer the prompts were encoded with.
        removed_bytes: per prompt, the bytes removed from its end (``b""`` for prompts that were not backed off).
        prompt_length: length of the (padded) prompt ``input_ids`` handed to ``generate``.

    Raises:
        ValueError: from ``__call__``, if no consistent token of a row is left (an earlier processor set them all
            to ``-inf``).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, removed_bytes: Sequence[bytes], prompt_length: int):
        if not removed_bytes:
            raise ValueError("removed_bytes is empty: need one entry per prompt")
        if not all(isinstance(b, bytes) for b in removed_bytes):
            raise TypeError("removed_bytes must hold one bytes object per prompt")
        if prompt_length < 1:
            raise ValueError(f"prompt_length must be >= 1, got {prompt_length}")
        self.table = token_bytes(tokenizer)
        self.prompt_length = prompt_length
        self.healings = [_Healing(self.table, b) if b else None for b in removed_bytes]
        # each constrained token consumes at least one byte
        self.max_steps = max(len(b) for b in removed_bytes)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        if step < 0:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} positions, fewer than prompt_length={self.prompt_length}"
            )
        if step >= self.max_steps:
            return scores
        rows, prompts = scores.shape[0], len(self.healings)
        if rows % prompts:
            raise ValueError(f"{rows} score rows cannot be split evenly among {prompts} prompts")
        expansion = rows // prompts
        generated = input_ids[:, self.prompt_length :].tolist()
        row_index, token_index, healing_rows = [], [], []
        for row, tokens in enumerate(generated):
            healing = self.healings[row // expansion]
            offset = healing.offset_after(tokens) if healing is not None else None
            if offset is None:
                continue
            allowed = healing.allowed(offset, scores.device)
            if len(self.table) > scores.shape[-1]:  # a tokenizer larger than the model's output layer
                allowed = allowed[allowed < scores.shape[-1]]
            healing_rows.append(row)
            row_index.append(torch.full_like(allowed, row))
            token_index.append(allowed)
        if not healing_rows:
            return scores
        # -inf everywhere in the healing rows, then copy back the allowed entries: O(V) per row, no dense mask
        rows_t = torch.tensor(healing_rows, device=scores.device)
        row_index, token_index = torch.cat(row_index), torch.cat(token_index)
        allowed_scores = scores[row_index, token_index]
        masked = scores.index_fill(0, rows_t, float("-inf"))
        masked[row_index, token_index] = allowed_scores
        alive = torch.zeros(rows, dtype=torch.long, device=scores.device)
        alive.index_add_(0, row_index, (allowed_scores > float("-inf")).long())
        dead = alive[rows_t] == 0
        if bool(dead.any()):
            row = healing_rows[int(dead.nonzero()[0])]
            raise ValueError(
                f"row {row}: no token consistent with the backed-off prompt text is left: all were set to -inf by "
                "an earlier logits processor (bad_words_ids, suppress_tokens, ...) or lie outside the model's "
                "vocabulary, so healing cannot continue"
            )
        return masked


# ---------------------------------------------------------------------------------------------------------------------
# Streaming


class _HealedStreamer(BaseStreamer):
    """Shows a streamer the user's own prompt followed by only the text that extends it.

    ``generate`` would stream the shortened prompt and then tokens that re-spell the removed text, so a streamer with
    ``skip_prompt=True`` would print the removed text again. This proxy sends the original prompt ids first, holds the
    healing tokens back, and sends their overhang past the removed bytes as vocabulary pieces (greedy longest match).
    """

    def __init__(self, inner: BaseStreamer, prompt_ids: Sequence[int], table: TokenBytes, removed: bytes):
        self.inner, self.prompt_ids, self.table, self.removed = inner, list(prompt_ids), table, removed
        self._prompt_sent = False
        self._healed = b""

    def _pieces_for(self, data: bytes) -> list[int] | None:
        out, start = [], 0
        while start < len(data):
            end = next((e for e in range(len(data), start, -1) if self.table.exact(data[start:e])), None)
            if end is None:
                return None
            out.append(self.table.exact(data[start:end])[0])
            start = end
        return out

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_sent:
            self._prompt_sent = True
            self.inner.put(torch.tensor([self.prompt_ids], dtype=torch.long))
            return
        if value.numel() != 1:
            raise ValueError("streaming a healed prompt supports one sequence (batch size 1, num_return_sequences 1)")
        if self._healed is None:
            self.inner.put(value)
            return
        index = int(value.reshape(-1)[0])
        piece = self.table.pieces[index] if 0 <= index < len(self.table) else None
        if piece is None:  # cannot happen under the mask; pass the token on rather than lose it
            self._healed = None
            self.inner.put(value)
            return
        self._healed += piece
        if len(self._healed) < len(self.removed):
            return
        overhang, self._healed = self._healed[len(self.removed) :], None
        ids = self._pieces_for(overhang)
        if ids is None:
            logger.warning("cannot spell the healed overhang %r with vocabulary pieces; streaming the token", overhang)
            ids = [index]
        if ids:
            self.inner.put(torch.tensor(ids, dtype=torch.long))

    def end(self) -> None:
        self.inner.end()


# ---------------------------------------------------------------------------------------------------------------------
# generate


def _prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompts: str | Sequence[str] | Sequence[Sequence[int]] | torch.Tensor,
    attention_mask: torch.Tensor | None,
    add_special_tokens: bool,
) -> list[list[int]]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, torch.Tensor):
        if prompts.dtype not in (torch.long, torch.int, torch.int32, torch.int16):
            raise TypeError(f"prompt ids must be an integer tensor, got {prompts.dtype}")
        ids = prompts.reshape(1, -1) if prompts.dim() == 1 else prompts
        if ids.dim() != 2:
            raise ValueError(f"prompt ids must be 1-D or 2-D, got shape {tuple(prompts.shape)}")
        if attention_mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        else:
            mask = attention_mask.reshape(ids.shape).bool()
        rows = [row[m].tolist() for row, m in zip(ids.cpu(), mask.cpu())]
    else:
        if attention_mask is not None:
            raise ValueError("attention_mask is only accepted with tensor prompts")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: pass at least one prompt")
        if all(isinstance(p, str) for p in prompts):
            rows = tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]
        elif all(isinstance(p, Sequence) and not isinstance(p, str) for p in prompts):
            rows = [[int(i) for i in p] for p in prompts]
        else:
            raise TypeError("prompts must be a str, a list of str, a list of token-id lists, or an id tensor")
    if not rows:
        raise ValueError("prompts is empty: pass at least one prompt")
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {i} has no tokens (empty text and no BOS token): generation needs a context")
    return rows


def _pad_id(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, model.generation_config.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0  # any id: padded positions are masked out


def generate_healed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: str | Sequence[str] | Sequence[Sequence[int]] | torch.Tensor,
    *,
    max_backoff_tokens: int = 2,
    add_special_tokens: bool = True,
    **generate_kwargs: Any,
) -> Any:
    """``model.generate`` with the continuation fix for prompts that end inside a token.

    Each prompt is tokenised, its last ``k <= max_backoff_tokens`` tokens are removed when their text is a proper
    prefix of a longer token (see :func:`back_off`), and generation is constrained until it has re-spelled the removed
    bytes, each step drawing from the model's distribution restricted to consistent tokens and renormalised. All
    prompts run in one left-padded ``generate`` call.

    Args:
        model: a causal LM.
        tokenizer: its fast tokenizer (byte-level BPE, BytePiece, or SentencePiece-style).
        prompts: a string, a list of strings, a list of token-id lists, or an id tensor (with ``attention_mask=`` in
            ``generate_kwargs`` if it is padded).
        max_backoff_tokens: most trailing tokens removed per prompt; 0 is plain ``generate``.
        add_special_tokens: passed to the tokenizer when ``prompts`` are strings.
        **generate_kwargs: passed to ``model.generate`` (``max_new_tokens``, ``do_sample``, ``num_return_sequences``,
            ``streamer``, ``logits_processor``, ``return_dict_in_generate``...). ``max_new_tokens`` counts the tokens
            that re-spell the removed text too.

    Returns:
        What ``model.generate`` returns. Each sequence is the shortened prompt (left-padded) followed by the generated
        tokens, so ``tokenizer.decode(seq, skip_special_tokens=True)`` starts with the prompt text; decode the whole
        sequence rather than slicing off the input length. A streamer receives the original prompt and then only the
        text beyond it (one sequence only).

    Raises:
        ValueError: empty ``prompts``, an empty prompt, a negative ``max_backoff_tokens``, ``input_ids`` in
            ``generate_kwargs``, or a tokenizer without a byte view of its vocabulary.
        TypeError: prompts of the wrong type, or a tokenizer without a ``tokenizers`` backend.
    """
    if isinstance(max_backoff_tokens, bool) or not isinstance(max_backoff_tokens, int) or max_backoff_tokens < 0:
        raise ValueError(f"max_backoff_tokens must be an int >= 0, got {max_backoff_tokens!r}")
    for key in ("input_ids", "inputs"):
        if key in generate_kwargs:
            raise ValueError(f"pass the prompts positionally, not as {key}=")
    rows = _prompt_ids(tokenizer, prompts, generate_kwargs.pop("attention_mask", None), add_special_tokens)
    table = token_bytes(tokenizer)

    cuts = [back_off(table, row, max_backoff_tokens) for row in rows]
    removed = [b"".join(table.pieces[i] for i in row[len(row) - k :]) for row, k in zip(rows, cuts)]
    trimmed = [row[: len(row) - k] for row, k in zip(rows, cuts)]
    length = max(len(row) for row in trimmed)
    pad = _pad_id(model, tokenizer)
    input_ids = torch.tensor([[pad] * (length - len(row)) + row for row in trimmed], device=model.device)
    attention_mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in trimmed], device=model.device)
    if "pad_token_id" not in generate_kwargs and model.generation_config.pad_token_id is None:
        generate_kwargs["pad_token_id"] = pad

    if any(cuts):
        processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
        processors.append(HealingLogitsProcessor(tokenizer, removed, length))
        generate_kwargs["logits_processor"] = processors
        streamer = generate_kwargs.get("streamer")
        if streamer is not None:
            if len(rows) != 1:
                raise ValueError("streaming a healed prompt supports one sequence (batch size 1)")
            generate_kwargs["streamer"] = _HealedStreamer(streamer, rows[0], table, removed[0])
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
