"""The ``hf-su`` command.

Each subcommand is a thin wrapper over the library: it parses arguments, calls one public function and prints the
result. Subcommands register themselves in :data:`_COMMANDS` with a parser builder and a handler.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable, Sequence
from importlib import metadata

from . import __version__

Handler = Callable[[argparse.Namespace], int]


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cmd_env(args: argparse.Namespace) -> int:
    """Print versions, the compute device and optional capabilities (paste this into bug reports)."""
    import torch

    from .capabilities import flash_attn_status
    from .data import embedded_corpus_stats

    flash_ok, flash_reason = flash_attn_status()
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.device_count()} x {torch.cuda.get_device_name(0)})"
    else:
        device = f"cpu ({torch.get_num_threads()} threads)"
    rows = [
        ("hf_su", __version__),
        ("python", platform.python_version()),
        ("platform", platform.platform()),
        *((name, _package_version(name)) for name in ("torch", "transformers", "accelerate", "datasets", "tokenizers")),
        ("device", device),
        ("flash-attn", "usable" if flash_ok else f"not usable: {flash_reason}"),
    ]
    if args.corpus:
        stats = embedded_corpus_stats()
        rows.append(
            (
                "embedded corpus",
                f"{stats['topics_documents'] + stats['docstrings_documents']} documents, {stats['total_bytes'] / 1e6:.2f} MB",
            )
        )
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _add_env(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("env", help="print versions, device and capabilities", description=_cmd_env.__doc__)
    parser.add_argument("--corpus", action="store_true", help="also measure the embedded corpus (takes ~2 s)")
    parser.set_defaults(handler=_cmd_env)


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_env]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-su",
        description="Su Jianlin's 2023 LLM ideas (ReRoPE, HWFA, EMO, Tiger, BytePiece, ...) on the Hugging Face stack.",
    )
    parser.add_argument("--version", action="version", version=f"hf-su {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add_command in _COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
