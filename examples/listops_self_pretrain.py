"""ListOps: train the same small Transformer from scratch and with self-pretraining, and compare accuracy.

"Never Train from Scratch" (Amos et al. 2023) reports that pretraining a Transformer on the task's own training
inputs before fine-tuning closes most of its gap to state-space models on Long Range Arena; ListOps is one of its
tasks (masked denoising at 10%). This script reproduces the direction of that effect at laptop scale: ListOps
expressions generated from the task definition (no downloads), a 4-layer bidirectional rotary Transformer
(ModernBERT architecture, as the paper's §3.2 rotary encoder), and three runs on the same data:

* from scratch, fine-tuning epochs only;
* from scratch, given the self-pretraining epochs as extra fine-tuning epochs (same total compute);
* self-pretrained (masked denoising, 10%), best checkpoint by validation loss, then the same fine-tuning.

Defaults run in about 15 minutes on 2 CPU cores and print a markdown table (also written as JSON with --json).

    python examples/listops_self_pretrain.py [--train-size 4000] [--pretrain-epochs 8] [--finetune-epochs 8]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from transformers import ModernBertConfig

from hf_su.tasks.listops import generate_listops, listops_dataset, listops_tokenizer
from hf_su.trainer.self_pretrain import self_pretrain_and_finetune


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--min-length", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-depth", type=int, default=4)
    parser.add_argument("--pretrain-epochs", type=float, default=8)
    parser.add_argument("--finetune-epochs", type=float, default=8)
    parser.add_argument("--mask-ratio", type=float, default=0.1, help="the paper's ListOps setting")
    parser.add_argument("--pooling", choices=["mean", "max", "last"], default="mean")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="default: a temporary folder")
    parser.add_argument("--json", default=None, help="write the results table as JSON here")
    return parser.parse_args()


def backbone_config(vocab_size: int, args: argparse.Namespace, tokenizer) -> ModernBertConfig:
    return ModernBertConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        max_position_embeddings=args.max_length,
        global_attn_every_n_layers=1,  # every layer attends globally
        local_attention=args.max_length,
        pad_token_id=tokenizer.pad_token_id,
        mask_token_id=tokenizer.mask_token_id,
        cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.cls_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.cls_token_id,
    )


def main() -> None:
    args = parse_args()
    tokenizer = listops_tokenizer()
    bounds = dict(min_length=args.min_length, max_length=args.max_length, max_depth=args.max_depth)
    train = listops_dataset(generate_listops(args.train_size, seed=args.seed, **bounds), tokenizer)
    valid = listops_dataset(generate_listops(args.eval_size, seed=args.seed + 1, **bounds), tokenizer)
    majority = max(valid["label"].count(c) for c in range(10)) / len(valid)
    common = dict(
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=args.learning_rate,
        warmup_steps=50,
        weight_decay=0.01,
        use_cpu=True,
        logging_steps=50,
        disable_tqdm=False,
    )
    runs = [
        ("from scratch", None, args.finetune_epochs),
        ("from scratch, same total epochs", None, args.finetune_epochs + args.pretrain_epochs),
        (f"self-pretrained (masked {args.mask_ratio:.0%})", "masked", args.finetune_epochs),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.output_dir or tmp
        for index, (name, objective, finetune_epochs) in enumerate(runs):
            start = time.perf_counter()
            result = self_pretrain_and_finetune(
                backbone_config(len(tokenizer), args, tokenizer),
                tokenizer,
                train,
                valid,
                output_dir=os.path.join(root, f"run{index}"),
                num_labels=10,
                objective=objective,
                mask_ratio=args.mask_ratio,
                pooling=args.pooling,
                pretrain_args=dict(common, num_train_epochs=args.pretrain_epochs),
                finetune_args=dict(common, num_train_epochs=finetune_epochs),
                seed=args.seed,
            )
            rows.append(
                {
                    "run": name,
                    "fine-tune epochs": finetune_epochs,
                    "self-pretrain epochs": args.pretrain_epochs if objective else 0,
                    "accuracy": result.metrics["eval_accuracy"],
                    "minutes": (time.perf_counter() - start) / 60,
                }
            )
    print(
        f"\nListOps, {args.train_size} train / {args.eval_size} validation expressions, "
        f"length {args.min_length}-{args.max_length}, depth <= {args.max_depth}; majority class {majority:.3f}\n"
    )
    print("| run | self-pretrain epochs | fine-tune epochs | accuracy | minutes |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['run']} | {row['self-pretrain epochs']:g} | {row['fine-tune epochs']:g} | "
            f"{row['accuracy']:.3f} | {row['minutes']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "majority_class": majority, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
