"""The main job: train a small causal LM on text with EMOTrainer (+ Tiger), BytePiece and optional HWFA.

:func:`train_causal_lm` is what ``hf-su train`` runs. Everything it needs is validated before anything is written;
a finished run leaves ``output_dir`` with ``save_pretrained`` files (model, config, tokenizer) and
``training_summary.json``; checkpoints live in ``output_dir/checkpoints`` so ``resume=True`` continues an
interrupted run exactly. Under ``accelerate launch`` / ``torchrun`` the same code runs data-parallel: the tokenizer
is trained once on the main process, and ``Trainer`` handles the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

MODEL_PRESETS: dict[str, dict[str, int]] = {
    # a smoke-test size: seconds per hundred steps on a laptop CPU
    "tiny": dict(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    # the default: ~4M non-embedding parameters, a few minutes on 2 CPU cores
    "small": dict(
        hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
    ),
    "base": dict(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4
    ),
}
SUMMARY_FILE = "training_summary.json"
# Tiger's lr is relative: each matrix steps by lr * its RMS (~0.02 at HF's initialisation), each embedding row by
# lr * the row's RMS, gains and biases by lr / 2. Its options go in as TrainingArguments.optim_args (the user's
# optim_args override them). Su's beta 0.965 (tuned on large batches and long runs) makes the sign step follow a
# ~30-step gradient average that lags this job's fast-changing from-scratch gradients at 8 x 256 tokens per step:
# with it Tiger trails AdamW by 0.4-0.8 nats after 400 steps at lr 1e-2 and 3e-2 (beta 0.99: worse still); with 0.9,
# the update window of Lion and AdamW, lr 2e-2 beats AdamW at 1e-3. Larger lrs compound: RMS-relative sign steps
# grow weights geometrically, and at 1e-1 they run into weight decay's fixed point +-1/weight_decay.
# Numbers: benchmarks/tiger_from_scratch.py.
DEFAULT_LEARNING_RATES = {"tiger": 2e-2, "adamw": 1e-3}
DEFAULT_TIGER_OPTIONS = "beta=0.9"


class PipelineError(ValueError):
    """A problem with the user's inputs, reported as one line by the CLI."""


@dataclass
class TrainSettings:
    """Everything ``hf-su train`` takes; the defaults are the embedded-default main job."""

    output_dir: str = "hf_su_runs/default"
    data: Sequence[str] = ()  # text files (.txt: one document per file; .jsonl: one {"text": ...} per line)
    dataset: str | None = None  # a datasets dataset saved with save_to_disk, or a local data file/dir for load_dataset
    text_column: str = "text"
    max_chars: int | None = None  # cap on the training text (characters), for quick runs
    tokenizer: str | None = None  # HF tokenizer dir or a BytePiece .model file; None: train BytePiece on the data
    vocab_size: int = 4096
    model: str = "small"  # a preset of MODEL_PRESETS or a local model/config directory
    attention: str = "rope"  # "rope": the model as configured (full attention for presets) or "hwfa"
    hwfa_window: int = 64
    hwfa_full_layers: Sequence[int] | None = None
    seq_len: int = 256
    loss: str = "mix"  # EMO mode: mix | emo2 | emo | ce
    emo_cost: str = "adaptive"
    optimizer: str = "tiger"  # tiger | adamw
    # None: 2e-2 for Tiger (its steps are relative to each tensor's RMS: 2% per step) or 1e-3 for AdamW
    learning_rate: float | None = None
    weight_decay: float = 0.01
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 600
    warmup_steps: int = 30
    eval_fraction: float = 0.05
    eval_steps: int = 200
    save_steps: int = 200
    logging_steps: int = 20
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    extra_training_args: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------------------


def read_documents(settings: TrainSettings) -> list[str]:
    """The documents named by ``settings`` (files, a dataset, or the embedded corpus), capped at ``max_chars``."""
    if settings.data and settings.dataset:
        raise PipelineError("give either --data files or --dataset, not both")
    documents: list[str] = []
    if settings.data:
        for path in settings.data:
            if not os.path.isfile(path):
                raise PipelineError(f"data file not found: {path}")
            with open(path, encoding="utf-8") as f:
                if path.endswith(".jsonl"):
                    for number, line in enumerate(f, 1):
                        if line.strip():
                            try:
                                documents.append(json.loads(line)[settings.text_column])
                            except (json.JSONDecodeError, KeyError, TypeError) as err:
                                raise PipelineError(
                                    f"{path}:{number}: not a JSON object with a {settings.text_column!r} field ({err})"
                                ) from None
                else:
                    documents.append(f.read())
    elif settings.dataset:
        documents = _dataset_texts(settings.dataset, settings.text_column)
    else:
        from .data import embedded_corpus

        documents = list(embedded_corpus())
    documents = [d for d in documents if d.strip()]
    if settings.max_chars is not None:
        documents = _cap_chars(documents, settings.max_chars)
    if not documents:
        raise PipelineError("the training corpus is empty")
    return documents


def _dataset_texts(name: str, column: str) -> list[str]:
    import datasets

    try:
        if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_info.json")):
            dataset = datasets.load_from_disk(name)
        else:
            dataset = datasets.load_dataset(name)
    except Exception as err:  # datasets raises many types for a missing or malformed source
        raise PipelineError(f"could not load dataset {name!r}: {err}") from None
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    if column not in dataset.column_names:
        raise PipelineError(f"dataset {name!r} has no column {column!r} (columns: {dataset.column_names})")
    return list(dataset[column])


def _cap_chars(documents: list[str], max_chars: int) -> list[str]:
    kept, total = [], 0
    for doc in documents:
        if total >= max_chars:
            break
        kept.append(doc[: max_chars - total])
        total += len(kept[-1])
    return kept


def split_documents(documents: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic split: every ``round(1/eval_fraction)``-th document is held out (at least one, if possible)."""
    if not 0 < eval_fraction < 1:
        raise PipelineError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if len(documents) < 2:
        # one document: hold out its tail so evaluation still sees unseen text
        cut = int(len(documents[0]) * (1 - eval_fraction))
        return [documents[0][:cut]], [documents[0][cut:]]
    stride = max(2, round(1 / eval_fraction))
    held = set(range(stride - 1, len(documents), stride)) or {len(documents) - 1}
    return [d for i, d in enumerate(documents) if i not in held], [d for i, d in enumerate(documents) if i in held]


def pack_blocks(token_streams: Iterator[list[int]], block: int, eos_id: int | None) -> list[list[int]]:
    """Concatenate documents (separated by ``eos_id``) and cut the stream into full blocks of ``block`` tokens."""
    stream: list[int] = []
    for ids in token_streams:
        stream.extend(ids)
        if eos_id is not None:
            stream.append(eos_id)
    return [stream[i : i + block] for i in range(0, len(stream) - block + 1, block)]


# --------------------------------------------------------------------------------------------------------------------
# tokenizer and model
# --------------------------------------------------------------------------------------------------------------------


def _load_or_train_tokenizer(settings: TrainSettings, train_docs: list[str], work_dir: str):
    from .tokenization.bytepiece import BytePieceTokenizerFast, load_tokenizer

    if settings.tokenizer:
        path = settings.tokenizer
        if not os.path.exists(path):
            raise PipelineError(f"tokenizer not found: {path}")
        return load_tokenizer(path)  # a BytePiece .model file or directory comes back as BytePieceTokenizerFast
    from .tokenization.train import train_bytepiece

    model_file = os.path.join(work_dir, "bytepiece.model")
    if not os.path.exists(model_file):
        train_bytepiece(
            train_docs,
            vocab_size=settings.vocab_size,
            output=model_file,
            max_piece_length=16,
            progress=settings.progress,
        )
    return BytePieceTokenizerFast.from_bytepiece(model_file)


def _model_config(settings: TrainSettings, vocab_size: int, tokenizer=None):
    """The model config: a preset sized for ``vocab_size``, or the one in ``settings.model``; HWFA applied if asked."""
    from transformers import LlamaConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if settings.model in MODEL_PRESETS:
        special = {}
        if tokenizer is not None:
            special = dict(
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        config = LlamaConfig(
            vocab_size=vocab_size,
            max_position_embeddings=settings.seq_len,
            tie_word_embeddings=True,
            **special,
            **MODEL_PRESETS[settings.model],
        )
    else:
        if not os.path.isfile(os.path.join(settings.model, "config.json")):
            raise PipelineError(
                f"--model {settings.model!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor a directory with a "
                "config.json"
            )
        from .modeling.hwfa import load_config

        try:
            config = load_config(settings.model)  # a saved HWFA model keeps its attention implementation when re-saved
        except (ValueError, KeyError, OSError) as err:
            raise PipelineError(f"--model {settings.model!r}: unreadable config ({err})") from None
        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise PipelineError(f"--model {settings.model!r} is not a causal language model ({config.model_type})")
    if settings.attention == "hwfa":
        from .modeling.hwfa import hwfa_config

        try:
            config = hwfa_config(config, window=settings.hwfa_window, full_layers=settings.hwfa_full_layers)
        except (ValueError, TypeError) as err:
            raise PipelineError(f"--attention hwfa: {err}") from None
    elif settings.attention != "rope":
        raise PipelineError(f"--attention must be 'rope' or 'hwfa', got {settings.attention!r}")
    return config


def _build_model(settings: TrainSettings, config):
    from transformers import AutoModelForCausalLM

    has_weights = settings.model not in MODEL_PRESETS and any(
        f.endswith((".safetensors", ".bin")) for f in os.listdir(settings.model)
    )
    try:
        if has_weights:
            return AutoModelForCausalLM.from_pretrained(settings.model, config=config)
        return AutoModelForCausalLM.from_config(config)
    except (ValueError, OSError) as err:  # e.g. weights that do not fit the config
        raise PipelineError(f"--model {settings.model!r} could not be loaded: {err}") from None


# --------------------------------------------------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------------------------------------------------


def _validate(settings: TrainSettings) -> None:
    if settings.seq_len < 8:
        raise PipelineError(f"--seq-len must be at least 8, got {settings.seq_len}")
    if settings.attention == "hwfa" and settings.hwfa_window >= settings.seq_len:
        raise PipelineError(
            f"--hwfa-window {settings.hwfa_window} must be shorter than --seq-len {settings.seq_len} "
            "(a window as long as the context is full attention)"
        )
    if settings.optimizer not in ("tiger", "adamw"):
        raise PipelineError(f"--optimizer must be 'tiger' or 'adamw', got {settings.optimizer!r}")
    if settings.loss not in ("mix", "emo2", "emo", "ce"):
        raise PipelineError(f"--loss must be one of mix, emo2, emo, ce; got {settings.loss!r}")
    if settings.max_steps < 1 or settings.batch_size < 1 or settings.grad_accum < 1:
        raise PipelineError("--max-steps, --batch-size and --grad-accum must be positive")
    out = settings.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise PipelineError(f"output dir {out!r} exists and is not a directory")
    occupied = os.path.isdir(out) and bool(os.listdir(out))
    if settings.resume and not os.path.isdir(os.path.join(out, "checkpoints")):
        raise PipelineError(f"--resume: no checkpoints in {out!r} to resume from")
    if occupied and not settings.resume and not settings.overwrite:
        raise PipelineError(
            f"output dir {out!r} is not empty; pass --resume to continue it or --overwrite to replace it"
        )
    _model_config(settings, vocab_size=settings.vocab_size)  # model and HWFA problems surface before any work


def train_causal_lm(settings: TrainSettings, *, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Run the main job; return the training summary (also written to ``output_dir/training_summary.json``).

    ``callbacks`` are ``transformers.TrainerCallback`` objects handed to the trainer (logging, early stopping, ...).

    Raises:
        PipelineError: a bad input (missing data file, empty corpus, not a causal LM, window >= sequence length,
            an occupied output dir, ...), detected before anything is written.
    """
    import torch
    from transformers import TrainingArguments, set_seed

    from .trainer.trainer import EMOTrainer

    _validate(settings)
    documents = read_documents(settings)
    train_docs, eval_docs = split_documents(documents, settings.eval_fraction)
    # --overwrite builds the new run beside the old one and swaps only at the end: a failure loses nothing
    final_dir = settings.output_dir
    work_dir = final_dir if not settings.overwrite else f"{final_dir.rstrip(os.sep)}.partial"
    if settings.overwrite and os.path.exists(work_dir):
        shutil.rmtree(work_dir)
    set_seed(settings.seed)
    extra_args = dict(settings.extra_training_args)
    if settings.optimizer == "tiger":  # later items win, so the user's optim_args override the defaults
        extra_args["optim_args"] = ",".join(filter(None, (DEFAULT_TIGER_OPTIONS, extra_args.get("optim_args"))))
    args = TrainingArguments(
        output_dir=os.path.join(work_dir, "checkpoints"),
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate or DEFAULT_LEARNING_RATES[settings.optimizer],
        weight_decay=settings.weight_decay,
        max_steps=settings.max_steps,
        warmup_steps=settings.warmup_steps,
        lr_scheduler_type="cosine",
        eval_strategy="steps",
        eval_steps=settings.eval_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,
        logging_steps=settings.logging_steps,
        seed=settings.seed,
        data_seed=settings.seed,
        report_to="none",
        disable_tqdm=not settings.progress,
        use_cpu=not torch.cuda.is_available(),
        **extra_args,
    )
    os.makedirs(work_dir, exist_ok=True)
    with args.main_process_first(desc="tokenizer"):
        tokenizer = _load_or_train_tokenizer(settings, train_docs, work_dir)
    config = _model_config(settings, len(tokenizer), tokenizer)
    model = _build_model(settings, config)

    def blocks(docs: list[str]) -> list[list[int]]:
        streams = (tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs)
        return pack_blocks(streams, settings.seq_len, tokenizer.eos_token_id)

    from datasets import Dataset

    train_blocks, eval_blocks = blocks(train_docs), blocks(eval_docs)
    if not train_blocks or not eval_blocks:
        raise PipelineError(
            f"the corpus yields {len(train_blocks)} training / {len(eval_blocks)} evaluation blocks of "
            f"{settings.seq_len} tokens; give more text or a shorter --seq-len"
        )
    to_dataset = lambda b: Dataset.from_dict({"input_ids": b, "labels": b})  # noqa: E731
    trainer = EMOTrainer(
        model=model,
        args=args,
        train_dataset=to_dataset(train_blocks),
        eval_dataset=to_dataset(eval_blocks),
        emo_mode=settings.loss,
        emo_cost=settings.emo_cost,
        optimizer=settings.optimizer,
        callbacks=list(callbacks),
    )
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if settings.resume else None)
    metrics = trainer.evaluate()
    summary = {
        "settings": asdict(settings),
        "train_length": settings.seq_len,
        "train_blocks": len(train_blocks),
        "eval_blocks": len(eval_blocks),
        "parameters": sum(p.numel() for p in model.parameters()),
        "global_step": trainer.state.global_step,
        "eval_loss": metrics.get("eval_loss"),
        "train_seconds": time.perf_counter() - start,
        "log_history": trainer.state.log_history,
    }
    if trainer.is_world_process_zero():
        trainer.save_model(work_dir)
        tokenizer.save_pretrained(work_dir)
        with open(os.path.join(work_dir, SUMMARY_FILE), "w") as f:
            json.dump(summary, f, indent=2, default=str)
        if work_dir != final_dir:
            if os.path.exists(final_dir):
                shutil.rmtree(final_dir)
            os.replace(work_dir, final_dir)
    return summary


def read_summary(model_dir: str) -> dict[str, Any] | None:
    """The ``training_summary.json`` of a finished run, or None if the folder has none."""
    path = os.path.join(model_dir, SUMMARY_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def held_out_token_ids(model_dir: str, *, eval_fraction: float | None = None, data: Sequence[str] = ()):
    """The evaluation token stream of a finished run: its held-out documents, tokenized with its tokenizer."""
    import torch

    from .tokenization.bytepiece import load_tokenizer

    saved = (read_summary(model_dir) or {}).get("settings", {})
    settings = TrainSettings(
        **{k: v for k, v in saved.items() if k in TrainSettings.__dataclass_fields__ and k not in ("data",)}
    )
    settings.data = tuple(data) or tuple(saved.get("data", ()))
    if eval_fraction is not None:
        settings.eval_fraction = eval_fraction
    _, eval_docs = split_documents(read_documents(settings), settings.eval_fraction)
    tokenizer = load_tokenizer(model_dir)
    ids: list[int] = []
    for doc in eval_docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)
