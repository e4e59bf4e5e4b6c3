"""BytePiece tokenizer adapter, trainer and Viterbi sampling.

Names are imported lazily so ``import hf_su.tokenization`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_LAZY_EXPORTS: dict[str, str] = {
    "SubwordRegularization": ".sampling",
    "encode_sampled": ".sampling",
    "viterbi_sample": ".sampling",
}

__all__ = list(_LAZY_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY_EXPORTS)


if TYPE_CHECKING:
    from .sampling import SubwordRegularization, encode_sampled, viterbi_sample  # noqa: F401
