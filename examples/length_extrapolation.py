"""Su's length-extrapolation experiment at laptop scale: train at 256 tokens, evaluate up to 2048.

Two small llama models are trained on the embedded corpus at length 256 with the main job (EMO loss + Tiger,
BytePiece tokenizer): one with full attention + RoPE in every layer, one HWFA (window layers + one full layer).
Then both are evaluated at 256, 512, 1024 and 2048 tokens with plain RoPE, ReRoPE, Leaky ReRoPE, transformers'
dynamic NTK and YaRN, and (for the HWFA model) HWFA + ReRoPE. Tables go to stdout and a JSON + PNG per model to
the output folder.

    python examples/length_extrapolation.py --output-dir hf_su_runs/extrapolation     # ~20 min on 2 CPU cores

The expected direction (Su's posts): RoPE degrades past its training length; ReRoPE and HWFA+ReRoPE hold.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from hf_su.eval_length import evaluate_lengths, plot_results, results_table, results_to_dicts
from hf_su.pipeline import TrainSettings, held_out_token_ids, train_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="hf_su_runs/extrapolation")
    parser.add_argument("--train-length", type=int, default=256)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--max-steps", type=int, default=800)
    parser.add_argument("--model", default="small")
    parser.add_argument("--hwfa-window", type=int, default=64)
    parser.add_argument(
        "--max-windows", type=int, default=8, help="windows at the longest length (all lengths score the same text)"
    )
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()

    report = {}
    for attention in ("rope", "hwfa"):
        out = os.path.join(args.output_dir, attention)
        start = time.perf_counter()
        if not os.path.exists(os.path.join(out, "training_summary.json")) or args.overwrite:
            train_causal_lm(
                TrainSettings(
                    output_dir=out,
                    model=args.model,
                    attention=attention,
                    hwfa_window=args.hwfa_window,
                    seq_len=args.train_length,
                    max_steps=args.max_steps,
                    eval_steps=args.max_steps,
                    save_steps=args.max_steps,
                    overwrite=args.overwrite,
                )
            )
        train_minutes = (time.perf_counter() - start) / 60
        results = evaluate_lengths(
            out,
            held_out_token_ids(out),
            train_length=args.train_length,
            lengths=args.lengths,
            max_windows=args.max_windows,
        )
        plot_results(results, os.path.join(out, "eval_length.png"), train_length=args.train_length)
        report[attention] = {"train_minutes": train_minutes, "results": results_to_dicts(results)}
        for metric in ("loss", "accuracy"):
            print(
                f"\n{attention} model ({train_minutes:.1f} min training), {metric}:\n{results_table(results, metric)}"
            )
    with open(os.path.join(args.output_dir, "extrapolation.json"), "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
