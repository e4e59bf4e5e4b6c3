"""hf_su: Su Jianlin's 2023 LLM ideas as production code for the Hugging Face stack.

The public API is re-exported here lazily: ``import hf_su`` does not import torch or transformers; the first
access to a name imports the module that defines it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it (relative to this package)
_LAZY_EXPORTS: dict[str, str] = {
    "embedded_corpus": ".data",
    "deer_rnn": ".modeling.deer",
    "hwfa_config": ".modeling.hwfa",
    "load_causal_lm": ".modeling.hwfa",
    "patch_rerope": ".modeling.rerope",
    "unpatch_rerope": ".modeling.rerope",
    "emo_loss": ".trainer.emo",
    "fused_emo_loss": ".trainer.emo",
    "EMOTrainer": ".trainer.trainer",
    "BytePieceTokenizerFast": ".tokenization.bytepiece",
    "load_tokenizer": ".tokenization.bytepiece",
    "train_bytepiece": ".tokenization.train",
    "viterbi_sample": ".tokenization.sampling",
    "Tiger": ".trainer.tiger",
    "tiger_param_groups": ".trainer.tiger",
    "generate_healed": ".generation.healing",
    "HealingLogitsProcessor": ".generation.healing",
}

__all__ = ["__version__", *_LAZY_EXPORTS]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY_EXPORTS)


if TYPE_CHECKING:  # static type checkers and IDEs see the real imports
    from .data import embedded_corpus  # noqa: F401
    from .generation.healing import HealingLogitsProcessor, generate_healed  # noqa: F401
    from .modeling.deer import deer_rnn  # noqa: F401
    from .modeling.hwfa import hwfa_config, load_causal_lm  # noqa: F401
    from .modeling.rerope import patch_rerope, unpatch_rerope  # noqa: F401
    from .tokenization.bytepiece import BytePieceTokenizerFast, load_tokenizer  # noqa: F401
    from .tokenization.sampling import viterbi_sample  # noqa: F401
    from .tokenization.train import train_bytepiece  # noqa: F401
    from .trainer.emo import emo_loss, fused_emo_loss  # noqa: F401
    from .trainer.tiger import Tiger, tiger_param_groups  # noqa: F401
    from .trainer.trainer import EMOTrainer  # noqa: F401
