"""Su's length-extrapolation experiment at laptop scale: train at 256 tokens, evaluate up to 2048.

Two small llama models are trained on the embedded corpus at length 256 with the main job (EMOTrainer, EMO + CE
loss, a 1,024-piece BytePiece tokenizer trained on the corpus): one with full attention + RoPE in every layer, one
HWFA (window-64 layers + one full layer). Then both are evaluated at 256, 512, 1024 and 2048 tokens with plain
RoPE, ReRoPE, Leaky ReRoPE, transformers' dynamic NTK and YaRN, and (for the HWFA model) HWFA + ReRoPE. Tables go
to stdout and a JSON + PNG per model to the output folder.

    python examples/length_extrapolation.py --output-dir hf_su_runs/extrapolation     # <= 20 min on 2 CPU cores

The two trainings run side by side, one process and one torch thread each (``--jobs 1`` runs them one after the
other with all threads): on a 2-core CPU that is faster than two runs that each use both cores. The optimizer is
AdamW at 3e-3: in our probes at this budget it reached a lower loss from scratch than Tiger (Tiger shines in longer
runs and fine-tuning, where its one-buffer memory matters), and a model must be trained far enough to use positions
before any extrapolation method can differ.

The expected direction (Su's posts): RoPE degrades past its training length; ReRoPE and HWFA+ReRoPE hold.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time

from hf_su.eval_length import evaluate_lengths, plot_results, results_table, results_to_dicts
from hf_su.pipeline import SUMMARY_FILE, TrainSettings, held_out_token_ids, train_causal_lm

ATTENTIONS = ("rope", "hwfa")


def settings_for(attention: str, args: argparse.Namespace, *, progress: bool) -> TrainSettings:
    return TrainSettings(
        output_dir=os.path.join(args.output_dir, attention),
        model=args.model,
        attention=attention,
        hwfa_window=args.hwfa_window,
        vocab_size=args.vocab_size,
        seq_len=args.train_length,
        optimizer=args.optimizer,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        max_steps=args.max_steps,
        eval_steps=args.max_steps,
        save_steps=args.max_steps,
        logging_steps=max(1, args.max_steps // 10),
        overwrite=args.overwrite,
        progress=progress,
    )


def train_one(attention: str, args: argparse.Namespace, threads: int | None) -> None:
    """Train one model (in its own process, with ``threads`` torch threads, when run side by side)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    train_causal_lm(settings_for(attention, args, progress=threads is None))


def train_all(todo: list[str], args: argparse.Namespace) -> None:
    if args.jobs < 2 or len(todo) < 2:
        for attention in todo:
            train_one(attention, args, None)
        return
    print(f"training {', '.join(todo)} side by side (one process and one torch thread each) ...", flush=True)
    # plain processes, not a Pool: a Pool's daemonic workers may not start the tokenizer trainer's own workers
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=train_one, args=(a, args, 1), name=a) for a in todo]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    failed = [w.name for w in workers if w.exitcode != 0]
    if failed:
        raise SystemExit(f"training failed for: {', '.join(failed)} (see the messages above)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="hf_su_runs/extrapolation")
    parser.add_argument("--train-length", type=int, default=256)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--model", default="small")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "tiger"))
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--hwfa-window", type=int, default=64)
    parser.add_argument(
        "--max-windows", type=int, default=8, help="windows at the longest length (all lengths score the same text)"
    )
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="models trained side by side")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()

    start = time.perf_counter()
    todo = [
        a for a in ATTENTIONS if args.overwrite or not os.path.exists(os.path.join(args.output_dir, a, SUMMARY_FILE))
    ]
    train_all(todo, args)
    train_minutes = (time.perf_counter() - start) / 60
    report = {"train_minutes": train_minutes, "args": vars(args)}
    for attention in ATTENTIONS:
        out = os.path.join(args.output_dir, attention)
        results = evaluate_lengths(
            out,
            held_out_token_ids(out),
            train_length=args.train_length,
            lengths=args.lengths,
            max_windows=args.max_windows,
        )
        plot_results(results, os.path.join(out, "eval_length.png"), train_length=args.train_length)
        report[attention] = results_to_dicts(results)
        for metric in ("loss", "accuracy"):
            print(f"\n{attention} model, {metric}:\n{results_table(results, metric)}")
    report["total_minutes"] = (time.perf_counter() - start) / 60
    print(f"\ntraining (wall): {train_minutes:.1f} min; total {report['total_minutes']:.1f} min")
    with open(os.path.join(args.output_dir, "extrapolation.json"), "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
