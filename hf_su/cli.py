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


def _fail(message: str) -> int:
    print(f"hf-su: error: {message}", file=sys.stderr)
    return 2


def _cmd_train(args: argparse.Namespace) -> int:
    """Train a causal LM with EMOTrainer (+ Tiger) on the embedded corpus or your text, and save it."""
    from .pipeline import PipelineError, TrainSettings, train_causal_lm

    settings = TrainSettings(
        output_dir=args.output_dir,
        data=tuple(args.data or ()),
        dataset=args.dataset,
        text_column=args.text_column,
        max_chars=args.max_chars,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        model=args.model,
        attention=args.attention,
        hwfa_window=args.hwfa_window,
        hwfa_full_layers=args.hwfa_full_layers,
        seq_len=args.seq_len,
        loss=args.loss,
        emo_cost=args.emo_cost,
        optimizer=args.optimizer,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_steps=args.max_steps,
        eval_steps=args.eval_steps,
        save_steps=args.save_steps,
        seed=args.seed,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        extra_training_args={"optim_args": args.optim_args} if args.optim_args else {},
    )
    try:
        summary = train_causal_lm(settings)
    except PipelineError as err:
        return _fail(str(err))
    finally:
        _leave_process_group()
    print(
        f"saved {args.output_dir}: {summary['parameters'] / 1e6:.2f}M parameters, {summary['global_step']} steps, "
        f"eval loss {summary['eval_loss']:.4f}"
    )
    return 0


def _leave_process_group() -> None:
    """End a torchrun / accelerate launch run cleanly: ranks that exit with the process group still up can abort
    in the backend's threads at interpreter shutdown ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # nobody tears down while another rank is still saving
        dist.destroy_process_group()


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    from .pipeline import MODEL_PRESETS, TrainSettings

    d = TrainSettings()
    p = subparsers.add_parser(
        "train", help="train a causal LM (EMO loss, Tiger, BytePiece, RoPE or HWFA)", description=_cmd_train.__doc__
    )
    p.add_argument("--output-dir", default=d.output_dir, help="where the model, tokenizer and summary go")
    data = p.add_argument_group("data (default: the embedded corpus)")
    data.add_argument("--data", nargs="+", metavar="FILE", help=".txt files (one document each) or .jsonl (text field)")
    data.add_argument("--dataset", help="a datasets dataset: a save_to_disk folder or a local load_dataset source")
    data.add_argument("--text-column", default=d.text_column)
    data.add_argument("--max-chars", type=int, help="use at most this many characters of text")
    tok = p.add_argument_group("tokenizer (default: train BytePiece on the data)")
    tok.add_argument("--tokenizer", help="a saved HF tokenizer folder or a BytePiece .model file")
    tok.add_argument("--vocab-size", type=int, default=d.vocab_size)
    model = p.add_argument_group("model")
    model.add_argument("--model", default=d.model, help=f"a preset ({', '.join(MODEL_PRESETS)}) or a local folder")
    model.add_argument("--attention", choices=["rope", "hwfa"], default=d.attention)
    model.add_argument("--hwfa-window", type=int, default=d.hwfa_window)
    model.add_argument("--hwfa-full-layers", type=int, nargs="+", help="full-attention layer indices (default: middle)")
    model.add_argument("--seq-len", type=int, default=d.seq_len, help="training length")
    train = p.add_argument_group("training")
    train.add_argument("--loss", choices=["mix", "emo2", "emo", "ce"], default=d.loss, help="EMO mixing mode")
    train.add_argument("--emo-cost", choices=["adaptive", "fixed"], default=d.emo_cost)
    train.add_argument("--optimizer", choices=["tiger", "adamw"], default=d.optimizer)
    train.add_argument("--learning-rate", type=float, help="default: 2e-2 for tiger (relative step), 1e-3 for adamw")
    train.add_argument(
        "--optim-args",
        help='Tiger options as TrainingArguments.optim_args, e.g. "beta=0.965,min_rms=0.05" (default: beta=0.9)',
    )
    train.add_argument("--batch-size", type=int, default=d.batch_size, help="per device")
    train.add_argument("--grad-accum", type=int, default=d.grad_accum)
    train.add_argument("--max-steps", type=int, default=d.max_steps)
    train.add_argument("--eval-steps", type=int, default=d.eval_steps)
    train.add_argument("--save-steps", type=int, default=d.save_steps)
    train.add_argument("--seed", type=int, default=d.seed)
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    train.add_argument("--overwrite", action="store_true", help="replace a finished run (swapped in only on success)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=_cmd_train)


def _cmd_eval_length(args: argparse.Namespace) -> int:
    """Loss and accuracy at several context lengths for RoPE, ReRoPE, Leaky ReRoPE, NTK, YaRN (and HWFA+ReRoPE)."""
    import json
    import os

    from .eval_length import evaluate_lengths, plot_results, results_table, results_to_dicts
    from .pipeline import SUMMARY_FILE, PipelineError, held_out_token_ids, read_summary

    if not os.path.isfile(os.path.join(args.model, "config.json")):
        return _fail(f"{args.model!r} is not a saved model folder (no config.json)")
    train_length = args.train_length
    if train_length is None:
        summary = read_summary(args.model)
        if summary is None:
            return _fail(f"no {SUMMARY_FILE} in {args.model!r}: pass --train-length")
        train_length = summary["train_length"]
    lengths = args.lengths or [train_length * k for k in (1, 2, 4, 8)]
    try:
        token_ids = held_out_token_ids(args.model, data=args.data or ())
        results = evaluate_lengths(
            args.model,
            token_ids,
            train_length=train_length,
            lengths=lengths,
            methods=args.methods,
            window=args.window,
            max_windows=args.max_windows,
            progress=not args.no_progress,
        )
    except (PipelineError, ValueError) as err:
        return _fail(str(err))
    for metric in ("loss", "accuracy", "tail_loss"):
        print(f"\n{results_table(results, metric)}")
    out_prefix = args.output or os.path.join(args.model, "eval_length")
    with open(out_prefix + ".json", "w") as f:
        json.dump({"train_length": train_length, "results": results_to_dicts(results)}, f, indent=2)
    written = [out_prefix + ".json"]
    try:
        plot_results(results, out_prefix + ".png", train_length=train_length)
        written.append(out_prefix + ".png")
    except ImportError:
        print('(no plot: matplotlib is not installed; pip install "hf-su[plot]")', file=sys.stderr)
    print(f"\nwrote {' and '.join(written)}")
    return 0


def _add_eval_length(subparsers: argparse._SubParsersAction) -> None:
    from .eval_length import METHODS

    p = subparsers.add_parser(
        "eval-length", help="per-length evaluation of extrapolation methods", description=_cmd_eval_length.__doc__
    )
    p.add_argument("model", help="a folder written by hf-su train (or any saved causal LM with --train-length)")
    p.add_argument("--lengths", type=int, nargs="+", help="default: 1, 2, 4, 8 x the training length")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="default: all that apply")
    p.add_argument("--window", type=int, help="ReRoPE window (default: half the training length)")
    p.add_argument("--train-length", type=int, help="default: read from training_summary.json")
    p.add_argument("--data", nargs="+", metavar="FILE", help="evaluation text (default: the run's held-out text)")
    p.add_argument(
        "--max-windows",
        type=int,
        default=8,
        help="evaluation windows at the longest length (shorter lengths score the same text)",
    )
    p.add_argument("--output", help="path prefix for .json and .png (default: MODEL/eval_length)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_cmd_eval_length)


def _cmd_generate(args: argparse.Namespace) -> int:
    """Continue a prompt with a saved model (the continuation fix on by default; ReRoPE optional)."""
    import os

    import torch

    from .generation.healing import generate_healed
    from .modeling.hwfa import load_causal_lm
    from .tokenization.bytepiece import load_tokenizer

    if not os.path.isfile(os.path.join(args.model, "config.json")):
        return _fail(f"{args.model!r} is not a saved model folder (no config.json)")
    try:
        tokenizer = load_tokenizer(args.model)
        model = load_causal_lm(args.model).eval()
    except (OSError, ValueError) as err:
        return _fail(f"could not load {args.model!r}: {err}")
    if args.rerope_window:
        from .modeling.rerope import patch_rerope

        patch_rerope(model, window=args.rerope_window)
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.sample else {}
    if args.seed is not None:
        torch.manual_seed(args.seed)
    max_backoff = 0 if args.no_heal else args.max_backoff_tokens
    out = generate_healed(
        model,
        tokenizer,
        [args.prompt],
        max_backoff_tokens=max_backoff,
        max_new_tokens=args.max_new_tokens,
        **sampling,
    )
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    return 0


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="continue a prompt with a saved model", description=_cmd_generate.__doc__
    )
    p.add_argument("model", help="a saved causal LM folder (with its tokenizer)")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-backoff-tokens", type=int, default=2, help="continuation fix: prompt tokens to back off")
    p.add_argument("--no-heal", action="store_true", help="plain generate, without the continuation fix")
    p.add_argument("--rerope-window", type=int, help="apply ReRoPE with this window before generating")
    p.set_defaults(handler=_cmd_generate)


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    """BytePiece tokenizers: train one, convert a reference .model file to HF format, or encode text."""
    import json
    import os

    from .tokenization.bytepiece import BytePieceTokenizerFast, load_tokenizer

    if args.action == "train":
        from .pipeline import PipelineError, TrainSettings, read_documents
        from .tokenization.train import train_bytepiece

        try:
            docs = read_documents(TrainSettings(data=tuple(args.data or ()), max_chars=args.max_chars))
        except PipelineError as err:
            return _fail(str(err))
        path = train_bytepiece(
            docs,
            vocab_size=args.vocab_size,
            output=args.output,
            max_piece_length=args.max_piece_length,
            isolate_digits=args.isolate_digits,
        )
        print(f"wrote {path}")
        if args.hf_dir:
            BytePieceTokenizerFast.from_bytepiece(path).save_pretrained(args.hf_dir)
            print(f"wrote {args.hf_dir}")
        return 0
    if args.action == "convert":
        if not os.path.isfile(args.source):
            return _fail(f"no such BytePiece model file: {args.source}")
        try:
            tokenizer = BytePieceTokenizerFast.from_bytepiece(args.source)
        except ValueError as err:
            return _fail(str(err))
        tokenizer.save_pretrained(args.output)
        print(f"wrote {args.output} ({len(tokenizer)} tokens); load it with AutoTokenizer.from_pretrained")
        return 0
    # encode
    tokenizer = load_tokenizer(args.tokenizer)
    if args.alpha is None:
        ids = tokenizer(args.text, add_special_tokens=False)["input_ids"]
    else:
        from .tokenization.sampling import encode_sampled

        ids = encode_sampled(tokenizer, args.text, alpha=args.alpha, seed=args.seed)
    pieces = [tokenizer.decode([i]) for i in ids]
    print(json.dumps({"ids": ids, "pieces": pieces}, ensure_ascii=False))
    return 0


def _add_tokenizer(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tokenizer", help="train / convert / encode BytePiece tokenizers", description=_cmd_tokenizer.__doc__
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = actions.add_parser("train", help="train a BytePiece model (reference .model format)")
    train.add_argument("--data", nargs="+", metavar="FILE", help="text files (default: the embedded corpus)")
    train.add_argument("--max-chars", type=int)
    train.add_argument("--vocab-size", type=int, default=8000)
    train.add_argument("--max-piece-length", type=int, default=36)
    train.add_argument("--isolate-digits", action="store_true")
    train.add_argument("--output", default="bytepiece.model")
    train.add_argument("--hf-dir", help="also save it as an HF tokenizer folder here")
    convert = actions.add_parser(
        "convert", help="convert a reference BytePiece .model file into an HF tokenizer folder"
    )
    convert.add_argument("source")
    convert.add_argument("output")
    encode = actions.add_parser("encode", help="print ids and pieces of a text")
    encode.add_argument("tokenizer", help="a BytePiece .model file or an HF tokenizer folder")
    encode.add_argument("text")
    encode.add_argument("--alpha", type=float, help="sample a segmentation (subword regularization) with this alpha")
    encode.add_argument("--seed", type=int)
    p.set_defaults(handler=_cmd_tokenizer)


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_env,
    _add_train,
    _add_eval_length,
    _add_generate,
    _add_tokenizer,
]


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
