"""What the running machine can do: one place for the checks that pick GPU code paths."""

from __future__ import annotations

import importlib.util
from functools import lru_cache


@lru_cache(maxsize=1)
def flash_attn_status() -> tuple[bool, str]:
    """Whether the flash-attn CUDA kernels can be used here, and why not when they cannot.

    Usable means: torch sees a CUDA device of compute capability 8.0 or newer (Ampere+), and the ``flash_attn``
    package imports. The reason string is meant for users (``hf-su env``) and for skip messages in tests.
    """
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"CUDA device of compute capability {major}.x (flash-attn needs 8.0+)"
    if importlib.util.find_spec("flash_attn") is None:
        return False, "flash-attn is not installed (pip install 'hf-su[flash]')"
    try:
        import flash_attn  # noqa: F401
    except Exception as err:  # a wheel built for another torch/CUDA fails at import with various errors
        return False, f"flash-attn does not import: {err}"
    return True, "available"


def flash_attn_available() -> bool:
    """True when :func:`flash_attn_status` reports the kernels usable."""
    return flash_attn_status()[0]
