"""BytePiece tokenizer adapter, trainer and Viterbi sampling.

Names are imported lazily so ``import hf_su.tokenization`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY_EXPORTS: dict[str, str] = {
    "SubwordRegularization": ".sampling",
    "encode_sampled": ".sampling",
    "viterbi_sample": ".sampling",
}

__all__ = list(_LAZY_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'hf_su.tokenization' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))


if TYPE_CHECKING:
    from .sampling import SubwordRegularization, encode_sampled, viterbi_sample  # noqa: F401
