"""Self-pretraining ("Never Train from Scratch", Amos et al. 2023): pretrain on the task's own inputs, then fine-tune.

The recipe has three parts, each usable alone:

* :class:`SelfPretrainingCollator` turns a classification dataset's ``input_ids`` into a denoising batch: masked
  (BERT-style corruption of exactly ``mask_ratio`` of the non-special tokens, in expectation) or causal (next-token
  labels). Labels of the task are dropped: no information beyond the training inputs is used.
* :class:`PooledSequenceClassifier` puts a pooled (``mean`` / ``max`` / ``last``) linear head on any ``AutoModel``
  backbone; :meth:`PooledSequenceClassifier.from_self_pretrained` starts it from a self-pretrained LM's body.
* :func:`self_pretrain_and_finetune` runs both stages with :class:`transformers.Trainer` (or a subclass such as
  ``EMOTrainer`` for a causal objective), keeps the self-pretraining checkpoint with the lowest validation loss, and
  returns the fine-tuned model and its metrics. ``objective=None`` trains the same classifier from scratch, for the
  comparison.

The paper's masking ratios: 10% for ListOps, 15% for text and retrieval, 50% for images (REFERENCES §2.1).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.modeling_outputs import SequenceClassifierOutput

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

Objective = Literal["masked", "causal"]
Pooling = Literal["mean", "max", "last"]
POOLINGS = ("mean", "max", "last")
OBJECTIVES = ("masked", "causal")
IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------------------------------
# Data: the self-pretraining collator
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class SelfPretrainingCollator:
    """Collate ``input_ids`` into a self-pretraining batch (``input_ids``, ``attention_mask``, ``labels``).

    Sequences are right-padded to the longest in the batch (times ``pad_to_multiple_of``). Padding and special
    tokens are never corrupted and never have a label. Other feature keys (the task label, raw text) are ignored.

    ``objective="masked"``: in each sequence, ``k`` of its ``n`` non-special tokens are chosen uniformly without
    replacement, with ``k = floor(mask_ratio * n + u)``, ``u ~ U[0, 1)`` (so ``E[k] = mask_ratio * n`` exactly and
    ``k`` is never off by more than one). A chosen token is replaced by ``mask_token_id`` with probability
    ``mask_replace_prob``, by a random non-special token with ``random_replace_prob``, else kept; its label is the
    original token. ``objective="causal"``: labels are the inputs (the model shifts them), padding ignored.

    Randomness: a ``seed`` gives a private generator (reproducible, and offset by the DataLoader worker id so
    workers differ); without one the global torch RNG is used (which ``Trainer`` seeds).
    """

    pad_token_id: int
    objective: Objective = "masked"
    mask_token_id: int | None = None
    mask_ratio: float = 0.1
    vocab_size: int | None = None
    special_token_ids: Iterable[int] = ()
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    pad_to_multiple_of: int | None = None
    seed: int | None = None
    _generators: dict[int, torch.Generator] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        self.special_token_ids = frozenset(self.special_token_ids) | {self.pad_token_id}
        if self.objective == "masked":
            if self.mask_token_id is None:
                raise ValueError("objective='masked' needs a mask_token_id (the tokenizer has no mask token?)")
            if not 0.0 < self.mask_ratio < 1.0:
                raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
            if self.mask_replace_prob < 0 or self.random_replace_prob < 0:
                raise ValueError("mask_replace_prob and random_replace_prob must be >= 0")
            if self.mask_replace_prob + self.random_replace_prob > 1.0:
                raise ValueError("mask_replace_prob + random_replace_prob must be <= 1")
            if self.random_replace_prob > 0 and self.vocab_size is None:
                raise ValueError("random_replace_prob > 0 needs vocab_size (to draw random tokens)")
            self.special_token_ids = self.special_token_ids | {self.mask_token_id}

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, **kwargs: Any) -> SelfPretrainingCollator:
        """Read pad/mask/special ids and the vocabulary size from a tokenizer; ``kwargs`` as for the constructor."""
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
        return cls(
            pad_token_id=tokenizer.pad_token_id,
            mask_token_id=tokenizer.mask_token_id,
            vocab_size=len(tokenizer),
            special_token_ids=tokenizer.all_special_ids,
            **kwargs,
        )

    def _generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        if worker_id not in self._generators:
            self._generators[worker_id] = torch.Generator().manual_seed(self.seed + 1_000_003 * worker_id)
        return self._generators[worker_id]

    def _pad(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        if not sequences or any(len(s) == 0 for s in sequences):
            raise ValueError("every example needs a non-empty input_ids")
        length = max(map(len, sequences))
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, seq in enumerate(sequences):
            input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            attention_mask[row, : len(seq)] = 1
        return input_ids, attention_mask

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = self._pad([f["input_ids"] for f in features])
        maskable = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(sorted(self.special_token_ids)))
        if self.objective == "causal":
            labels = input_ids.masked_fill(~attention_mask.bool(), IGNORE_INDEX)
            return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        chosen = self._choose(maskable)
        labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
        corrupted = input_ids.clone()
        gen = self._generator()
        action = torch.rand(input_ids.shape, generator=gen)
        to_mask = chosen & (action < self.mask_replace_prob)
        to_random = (
            chosen & (action >= self.mask_replace_prob) & (action < self.mask_replace_prob + self.random_replace_prob)
        )
        corrupted[to_mask] = self.mask_token_id
        if to_random.any():
            corrupted[to_random] = self._random_tokens(int(to_random.sum()), gen)
        return {"input_ids": corrupted, "attention_mask": attention_mask, "labels": labels}

    def _choose(self, maskable: torch.Tensor) -> torch.Tensor:
        """Per row, ``floor(ratio * n + u)`` of the ``n`` maskable positions, uniformly without replacement."""
        gen = self._generator()
        counts = maskable.sum(dim=1)
        k = torch.floor(self.mask_ratio * counts + torch.rand(counts.shape, generator=gen)).long()
        # Random keys, +inf on positions that may not be chosen; the k smallest keys of each row are the chosen ones.
        keys = torch.rand(maskable.shape, generator=gen).masked_fill(~maskable, float("inf"))
        ranks = keys.argsort(dim=1).argsort(dim=1)
        return ranks < k.unsqueeze(1)

    def _random_tokens(self, count: int, gen: torch.Generator | None) -> torch.Tensor:
        allowed = torch.ones(self.vocab_size, dtype=torch.bool)
        allowed[[i for i in self.special_token_ids if 0 <= i < self.vocab_size]] = False
        candidates = allowed.nonzero().squeeze(1)
        return candidates[torch.randint(len(candidates), (count,), generator=gen)]


# --------------------------------------------------------------------------------------------------------------------
# Model: a pooled classification head on any backbone
# --------------------------------------------------------------------------------------------------------------------


def pool_hidden_states(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, mode: Pooling) -> torch.Tensor:
    """Pool ``[B, T, H]`` hidden states over the valid (mask = 1) positions: ``mean``, ``max`` or ``last``.

    ``last`` takes the last valid position of each row, so it works for left and right padding.
    """
    if mode not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {mode!r}")
    if attention_mask is None:
        attention_mask = torch.ones(hidden_states.shape[:2], dtype=torch.long, device=hidden_states.device)
    valid = attention_mask.bool()
    if not valid.any(dim=1).all():
        raise ValueError("a row of attention_mask has no valid position to pool")
    if mode == "mean":
        weights = valid.unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1)
    if mode == "max":
        return hidden_states.masked_fill(~valid.unsqueeze(-1), torch.finfo(hidden_states.dtype).min).amax(dim=1)
    positions = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    last = positions.masked_fill(~valid, -1).amax(dim=1)
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]


class PooledClassifierConfig(PreTrainedConfig):
    """Config of :class:`PooledSequenceClassifier`: a backbone config, a pooling mode and the classifier size."""

    model_type = "hf_su_pooled_classifier"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}
    backbone_config: dict | PreTrainedConfig | None = None
    pooling: str = "mean"
    classifier_dropout: float = 0.0

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")


class PooledSequenceClassifier(PreTrainedModel):
    """Sequence classification: ``AutoModel`` backbone -> pooled hidden state -> dropout -> linear head.

    Unlike transformers' ``*ForSequenceClassification`` heads (first or last token), the pooling is chosen in the
    config; the paper found max pooling essential on its longest task. Saved and loaded with
    ``save_pretrained``/``from_pretrained``; ``AutoModelForSequenceClassification`` knows it once this module is
    imported (``import hf_su.trainer.self_pretrain``).
    """

    config_class = PooledClassifierConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: PooledClassifierConfig) -> None:
        super().__init__(config)
        self.backbone = AutoModel.from_config(config.backbone_config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.backbone_config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module is self.classifier:
            std = getattr(self.config.backbone_config, "initializer_range", 0.02)
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        else:  # the backbone's own initialisation scheme
            self.backbone._init_weights(module)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        outputs = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        pooled = pool_hidden_states(outputs.last_hidden_state, attention_mask, self.config.pooling)
        logits = self.classifier(self.dropout(pooled))
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)

    @classmethod
    def from_self_pretrained(
        cls, language_model: PreTrainedModel, *, num_labels: int, pooling: Pooling = "mean", classifier_dropout=0.0
    ) -> PooledSequenceClassifier:
        """A classifier whose backbone starts from a (self-)pretrained masked or causal LM's body; new head."""
        backbone_config = language_model.config.__class__.from_dict(language_model.config.to_dict())
        config = PooledClassifierConfig(
            backbone_config=backbone_config,
            pooling=pooling,
            num_labels=num_labels,
            classifier_dropout=classifier_dropout,
        )
        model = cls(config)
        body = getattr(language_model, language_model.base_model_prefix)
        model.backbone.load_state_dict(body.state_dict(), strict=True)
        return model.to(language_model.dtype)


AutoConfig.register(PooledClassifierConfig.model_type, PooledClassifierConfig, exist_ok=True)
AutoModelForSequenceClassification.register(PooledClassifierConfig, PooledSequenceClassifier, exist_ok=True)


# --------------------------------------------------------------------------------------------------------------------
# Recipe: self-pretrain, keep the best checkpoint, fine-tune
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class SelfPretrainResult:
    """What :func:`self_pretrain_and_finetune` produced."""

    model: PooledSequenceClassifier
    metrics: dict[str, float]
    finetuned_dir: str
    pretrained_dir: str | None = None
    best_pretrain_checkpoint: str | None = None
    best_pretrain_eval_loss: float | None = None


def _accuracy(eval_prediction) -> dict[str, float]:
    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def _training_args(output_dir: str, defaults: dict[str, Any], overrides: Mapping[str, Any] | None) -> TrainingArguments:
    return TrainingArguments(output_dir=output_dir, **{**defaults, **dict(overrides or {})})


def self_pretrain_and_finetune(
    backbone_config: PreTrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Dataset,
    eval_dataset: Dataset,
    *,
    output_dir: str,
    num_labels: int,
    objective: Objective | None = "masked",
    mask_ratio: float = 0.1,
    pooling: Pooling = "mean",
    pretrain_args: Mapping[str, Any] | None = None,
    finetune_args: Mapping[str, Any] | None = None,
    pretrain_trainer_cls: type[Trainer] = Trainer,
    finetune_trainer_cls: type[Trainer] = Trainer,
    seed: int = 0,
) -> SelfPretrainResult:
    """Self-pretrain a backbone on ``train_dataset``'s inputs, then fine-tune a pooled classifier on its labels.

    Args:
        backbone_config: the body to train, e.g. a bidirectional ``ModernBertConfig`` for ``objective="masked"`` or a
            ``LlamaConfig`` for ``"causal"``.
        tokenizer: gives pad/mask ids and is saved beside both models.
        train_dataset, eval_dataset: with ``input_ids`` and ``label`` columns. Self-pretraining uses only the
            inputs of ``train_dataset`` (validated on ``eval_dataset``'s inputs); no outside data.
        output_dir: gets ``self_pretrained/`` (the best checkpoint by validation loss) and ``finetuned/``.
        objective: ``"masked"``, ``"causal"``, or ``None`` to train the same classifier from scratch.
        pretrain_args, finetune_args: ``TrainingArguments`` overrides (epochs, learning rate, batch size, ...). The
            self-pretraining stage always evaluates and saves on the same schedule and reloads the checkpoint of
            lowest ``eval_loss`` at the end.
        pretrain_trainer_cls, finetune_trainer_cls: ``Trainer`` or a subclass (e.g. ``EMOTrainer`` for a causal
            self-pretraining objective).

    Returns:
        The fine-tuned model, its evaluation metrics (``eval_accuracy``, ``eval_loss``, ...) and where things went.
    """
    if objective is not None and objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES} or None, got {objective!r}")
    for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
        missing = {"input_ids", "label"} - set(dataset.column_names)
        if missing:
            raise ValueError(f"{name} lacks column(s) {sorted(missing)}")
    torch.manual_seed(seed)
    pretrained_dir = best_checkpoint = best_loss = None
    if objective is None:
        model = PooledSequenceClassifier(
            PooledClassifierConfig(backbone_config=backbone_config, pooling=pooling, num_labels=num_labels)
        )
    else:
        auto_cls = AutoModelForMaskedLM if objective == "masked" else AutoModelForCausalLM
        language_model = auto_cls.from_config(backbone_config)
        # Checkpoints must be saved exactly when they are evaluated, so the best one by eval_loss can be reloaded.
        overrides = dict(pretrain_args or {})
        schedule = {"eval_strategy": overrides.get("eval_strategy", "epoch")}
        schedule["save_strategy"] = schedule["eval_strategy"]
        if "eval_steps" in overrides:
            schedule["save_steps"] = overrides["eval_steps"]
        args = _training_args(
            os.path.join(output_dir, "self_pretrain_checkpoints"),
            dict(
                **schedule,
                load_best_model_at_end=True,
                metric_for_best_model="eval_loss",
                greater_is_better=False,
                save_total_limit=2,
                remove_unused_columns=False,
                report_to="none",
                seed=seed,
            ),
            overrides,
        )
        collator = SelfPretrainingCollator.from_tokenizer(tokenizer, objective=objective, mask_ratio=mask_ratio)
        inputs_only = [d.select_columns(["input_ids"]) for d in (train_dataset, eval_dataset)]
        trainer = pretrain_trainer_cls(
            model=language_model,
            args=args,
            train_dataset=inputs_only[0],
            eval_dataset=inputs_only[1],
            data_collator=collator,
        )
        trainer.train()
        best_checkpoint = trainer.state.best_model_checkpoint
        best_loss = trainer.state.best_metric
        pretrained_dir = os.path.join(output_dir, "self_pretrained")
        trainer.model.save_pretrained(pretrained_dir)
        tokenizer.save_pretrained(pretrained_dir)
        model = PooledSequenceClassifier.from_self_pretrained(trainer.model, num_labels=num_labels, pooling=pooling)

    args = _training_args(
        os.path.join(output_dir, "finetune_checkpoints"),
        dict(eval_strategy="epoch", save_strategy="no", report_to="none", seed=seed),
        finetune_args,
    )
    columns = ["input_ids", "label"]
    trainer = finetune_trainer_cls(
        model=model,
        args=args,
        train_dataset=train_dataset.select_columns(columns),
        eval_dataset=eval_dataset.select_columns(columns),
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=_accuracy,
    )
    trainer.train()
    metrics = trainer.evaluate()
    finetuned_dir = os.path.join(output_dir, "finetuned")
    trainer.model.save_pretrained(finetuned_dir)
    tokenizer.save_pretrained(finetuned_dir)
    return SelfPretrainResult(
        model=trainer.model,
        metrics=metrics,
        finetuned_dir=finetuned_dir,
        pretrained_dir=pretrained_dir,
        best_pretrain_checkpoint=best_checkpoint,
        best_pretrain_eval_loss=best_loss,
    )
