"""ListOps (Nangia & Bowman 2018), the Long Range Arena task: evaluate nested list operations over digits.

An expression is a tree whose leaves are digits 0-9 and whose inner nodes apply one of four operators to their
children: ``MAX``, ``MIN``, ``MED`` (median; for an even count, the mean of the two middle values rounded down, as
``int(numpy.median(...))`` gives on non-negative integers) and ``SM`` (sum modulo 10). The label is the value of the
whole expression, a digit, so the task is 10-way classification. Written out LRA-style, each operator opens with a
``[OP`` token and closes with ``]``::

    [MAX 2 9 [MIN 4 7 ] 0 ]      -> 9

:func:`generate_listops` samples random trees and keeps those whose token count lies in ``[min_length, max_length]``
and whose depth is at most ``max_depth``; :func:`listops_tokenizer` is a word-level HF tokenizer over its 16 symbols.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

OPERATORS: dict[str, Callable[[Sequence[int]], int]] = {
    "MAX": max,
    "MIN": min,
    "MED": lambda values: (sorted(values)[(len(values) - 1) // 2] + sorted(values)[len(values) // 2]) // 2,
    "SM": lambda values: sum(values) % 10,
}
SPECIAL_TOKENS = ("<pad>", "<unk>", "<mask>", "<cls>")
SYMBOLS = (*(f"[{op}" for op in OPERATORS), "]", *(str(d) for d in range(10)))


@dataclass(frozen=True)
class ListOpsExample:
    """One expression: its tokens (space-joined in ``text``), value and tree depth (a bare digit has depth 0)."""

    text: str
    label: int
    depth: int

    @property
    def length(self) -> int:
        return len(self.text.split())


class _TooLong(Exception):
    """Raised inside tree sampling once the token budget is exceeded (the sample is rejected anyway)."""


def _random_tree(
    rng: random.Random, depth_left: int, max_args: int, branch_prob: float, tokens: list[str], budget: int
) -> tuple[int, int]:
    """Append a sampled subtree's tokens to ``tokens``; return its (value, depth). The root branches always."""
    if len(tokens) >= budget:
        raise _TooLong
    if depth_left == 0 or (tokens and rng.random() >= branch_prob):
        digit = rng.randrange(10)
        tokens.append(str(digit))
        return digit, 0
    op = rng.choice(tuple(OPERATORS))
    tokens.append(f"[{op}")
    values, depth = [], 0
    for _ in range(rng.randint(2, max_args)):
        value, child_depth = _random_tree(rng, depth_left - 1, max_args, branch_prob, tokens, budget)
        values.append(value)
        depth = max(depth, child_depth)
    tokens.append("]")
    return OPERATORS[op](values), depth + 1


def generate_listops(
    num_examples: int,
    *,
    min_length: int = 32,
    max_length: int = 256,
    max_depth: int = 6,
    max_args: int = 5,
    seed: int = 0,
    max_tries: int | None = None,
) -> list[ListOpsExample]:
    """Sample ``num_examples`` expressions with ``min_length <= tokens <= max_length`` and depth ``<= max_depth``.

    The root is always an operator. Trees are grown with a branching probability drawn per tree, so lengths spread
    over the requested range; samples outside it are rejected. Deterministic for a given ``seed``.

    Raises:
        ValueError: inconsistent bounds, or the bounds reject (nearly) every sample.
    """
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    if not 3 <= min_length <= max_length:
        raise ValueError(f"need 3 <= min_length <= max_length, got min_length={min_length}, max_length={max_length}")
    if max_depth < 1 or max_args < 2:
        raise ValueError(f"need max_depth >= 1 and max_args >= 2, got {max_depth} and {max_args}")
    rng = random.Random(seed)
    max_tries = max_tries if max_tries is not None else 1000 * max(num_examples, 1)
    examples: list[ListOpsExample] = []
    for _ in range(max_tries):
        if len(examples) == num_examples:
            return examples
        tokens: list[str] = []
        try:
            value, depth = _random_tree(rng, max_depth, max_args, rng.uniform(0.25, 0.95), tokens, max_length)
        except _TooLong:
            continue
        if min_length <= len(tokens) <= max_length:
            examples.append(ListOpsExample(" ".join(tokens), value, depth))
    if len(examples) < num_examples:
        raise ValueError(
            f"only {len(examples)} of {num_examples} samples fit min_length={min_length}, max_length={max_length}, "
            f"max_depth={max_depth}, max_args={max_args} in {max_tries} tries; widen the bounds"
        )
    return examples


def listops_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the ListOps symbols; ``<pad>``/``<unk>``/``<mask>``/``<cls>`` are ids 0-3."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *SYMBOLS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", mask_token="<mask>", cls_token="<cls>"
    )


def listops_dataset(examples: Sequence[ListOpsExample], tokenizer: PreTrainedTokenizerFast | None = None):
    """A ``datasets.Dataset`` with ``text``, ``label``, ``input_ids`` (and ``attention_mask``) columns."""
    from datasets import Dataset

    tokenizer = tokenizer or listops_tokenizer()
    texts = [e.text for e in examples]
    encoded = tokenizer(texts)
    return Dataset.from_dict({"text": texts, "label": [e.label for e in examples], **encoded})
