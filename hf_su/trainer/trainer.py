"""``EMOTrainer``: a drop-in :class:`transformers.Trainer` that trains causal LMs with the fused EMO loss.

The model body runs as usual (through whatever wrapper the Trainer put around it: DDP, PEFT, ...), the final hidden
states are captured at the decoder's output, and :func:`~hf_su.trainer.emo.fused_emo_loss` is applied with the
model's output embedding, so the tokens×vocab logits are never materialised in training. Evaluation keeps the
model's own cross-entropy, so eval losses and perplexities compare with any other run.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint, unwrap_peft_model

from .emo import MODES, fused_emo_loss

COST_EMBEDDING_FILE = "emo_cost_embedding.safetensors"
COST_CHOICES = ("adaptive", "fixed")
OPTIMIZERS = ("adamw", "tiger")
TIGER_OPTIONS = ("beta", "min_rms", "shrink_ratio")


def tiger_options(optim_args: str | None) -> dict[str, float]:
    """Tiger keyword arguments from ``TrainingArguments.optim_args``, e.g. ``"beta=0.965,min_rms=0.0625"``.

    Raises:
        ValueError: an item that is not ``key=number`` with ``key`` in :data:`TIGER_OPTIONS`.
    """
    options: dict[str, float] = {}
    for item in (optim_args or "").replace(" ", "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        try:
            if not sep or key not in TIGER_OPTIONS:
                raise ValueError
            options[key] = float(value)
        except ValueError:
            raise ValueError(
                f"optim_args item {item!r} for Tiger must be key=number with key one of {', '.join(TIGER_OPTIONS)}"
            ) from None
    return options


class EMOTrainer(Trainer):
    """A :class:`~transformers.Trainer` whose training loss is EMO (Earth Mover Distance Optimization).

    Example::

        trainer = EMOTrainer(model=model, args=TrainingArguments("out", gradient_accumulation_steps=4),
                             train_dataset=ds, data_collator=collator, emo_mode="mix", emo_cost="adaptive")
        trainer.train()

    Args:
        model: a causal LM (``get_decoder()`` and ``get_output_embeddings()``), possibly PEFT-wrapped.
        args: the usual :class:`~transformers.TrainingArguments`.
        *trainer_args: passed on to :class:`~transformers.Trainer` (positionally after ``args``).
        emo_mode: ``"mix"`` (official mode 1, default), ``"emo2"`` (mode 2), ``"emo"`` or ``"ce"``.
        emo_cost: ``"adaptive"``: the current output embedding, detached (official ``*_adaptive``); ``"fixed"``:
            a frozen copy of the output embedding taken when training starts, saved in every checkpoint
            (``emo_cost_embedding.safetensors``) and restored on resume; or a ``[vocab, dim]`` tensor, e.g. the head
            of a larger pretrained model (official continual fine-tuning).
        emo_ratio_clip: cap of the detached CE/EMO ratio (the official continual fine-tuning script uses 3.0).
        emo_chunk_size: tokens per chunk of the fused loss (default: see ``default_chunk_size``).
        optimizer: ``"adamw"``: the Trainer's own optimizer (``args.optim``, AdamW by default; ``optimizers=`` and
            ``optimizer_cls_and_kwargs=`` are respected); ``"tiger"``: :class:`hf_su.trainer.tiger.Tiger` with
            ``tiger_param_groups``, ``args.learning_rate``, ``args.weight_decay`` and, from ``args.optim_args``
            (``"beta=0.965,min_rms=0.0625"``), its ``beta``, ``min_rms`` and ``shrink_ratio``.
        **trainer_kwargs: passed on to :class:`~transformers.Trainer`.

    Logs ``ce_loss`` and ``emo_loss`` (token means since the last log, over all processes) beside ``loss``.
    The loss is normalised by ``num_items_in_batch`` (all micro-batches, all ranks), so gradient accumulation and DDP
    give the same update as one large batch.

    Raises:
        ValueError: unknown mode, cost or optimizer; ``optim_args`` that Tiger does not take; a cost embedding whose vocab size differs from the model's; a
            model without output embeddings or decoder; options EMO cannot honour (``compute_loss_func``, label
            smoothing, ``nn.DataParallel``, LoRA on the output layer, a model that rescales its logits).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: Any = None,
        *trainer_args: Any,
        emo_mode: str = "mix",
        emo_cost: str | torch.Tensor = "adaptive",
        emo_ratio_clip: float | None = None,
        emo_chunk_size: int | None = None,
        optimizer: str = "adamw",
        **trainer_kwargs: Any,
    ) -> None:
        if emo_mode not in MODES:
            raise ValueError(f"unknown emo_mode {emo_mode!r}; choose from {MODES}")
        if not (torch.is_tensor(emo_cost) or emo_cost in COST_CHOICES):
            raise ValueError(f"emo_cost must be one of {COST_CHOICES} or a [vocab, dim] tensor, got {emo_cost!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose from {OPTIMIZERS}")
        if trainer_kwargs.get("compute_loss_func") is not None:
            raise ValueError("EMOTrainer computes its own loss; compute_loss_func cannot be combined with it")
        if optimizer == "tiger" and (
            trainer_kwargs.get("optimizer_cls_and_kwargs") is not None
            or (trainer_kwargs.get("optimizers") or (None, None))[0] is not None
        ):
            raise ValueError("optimizer='tiger' conflicts with a given optimizers= / optimizer_cls_and_kwargs=")
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        if optimizer == "tiger":
            tiger_options(self.args.optim_args)  # refuse bad options before training starts
        if self.args.label_smoothing_factor:
            raise ValueError(
                "label_smoothing_factor is not supported by EMOTrainer (the EMO cost already spreads credit)"
            )

        self.emo_mode = emo_mode
        self.emo_ratio_clip = emo_ratio_clip
        self.emo_chunk_size = emo_chunk_size
        self.emo_optimizer = optimizer
        self.emo_cost = "fixed" if torch.is_tensor(emo_cost) else emo_cost
        self._cost_embedding: torch.Tensor | None = emo_cost.detach().clone() if torch.is_tensor(emo_cost) else None

        base = unwrap_peft_model(self.model)
        head = _decoder_and_head(base)[1]  # fail early on models EMO cannot train
        vocab_size = head.weight.shape[0]
        if self._cost_embedding is not None and (
            self._cost_embedding.dim() != 2 or self._cost_embedding.shape[0] != vocab_size
        ):
            raise ValueError(
                f"vocab size mismatch: the model's output embedding has {vocab_size} rows but the given cost "
                f"embedding has shape {tuple(self._cost_embedding.shape)}"
            )
        self._logits_to_keep = "logits_to_keep" in inspect.signature(base.forward).parameters
        self._head_checked = False
        self._parts = torch.zeros(3, dtype=torch.float64, device=self.args.device)  # ce sum, emo sum, tokens

        # The loss is normalised by the Trainer's `num_items_in_batch`, which it only counts for models that take
        # loss kwargs, over shifted labels when the model's loss shifts them. Our loss always does both; evaluation
        # passes `num_items_in_batch` to the model only if its forward really accepts it (see compute_loss).
        self._forward_accepts_loss_kwargs = self.model_accepts_loss_kwargs
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True

    # ------------------------------------------------------------------------------------------------ training loss

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """EMO loss in training (normalised by ``num_items_in_batch`` when given); the model's own CE otherwise."""
        if not model.training:
            num_items = num_items_in_batch if self._forward_accepts_loss_kwargs else None
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items)
        if self.args.n_gpu > 1:
            raise ValueError("EMOTrainer does not support nn.DataParallel (n_gpu > 1); launch one process per device")

        inputs = dict(inputs)
        labels, shift_labels = inputs.pop("labels", None), inputs.pop("shift_labels", None)
        if shift_labels is None:
            if labels is None:
                raise ValueError("EMOTrainer needs `labels` (or `shift_labels`) in every training batch")
            shift_labels = F.pad(labels[..., 1:], (0, 1), value=-100)  # position i predicts token i + 1

        decoder, head = _decoder_and_head(unwrap_peft_model(self.accelerator.unwrap_model(model)))
        hidden, outputs = self._hidden_states(model, decoder, inputs)
        if not self._head_checked:
            self._check_logits_come_from_head(hidden, head, outputs)
        loss, parts = fused_emo_loss(
            hidden.to(head.weight.dtype),
            head.weight,
            shift_labels.to(hidden.device),
            lm_head_bias=head.bias if isinstance(getattr(head, "bias", None), torch.Tensor) else None,
            cost_embedding=self._current_cost(head.weight),
            mode=self.emo_mode,
            num_items_in_batch=num_items_in_batch,
            ratio_clip=self.emo_ratio_clip,
            chunk_size=self.emo_chunk_size,
            return_parts=True,
        )
        self._parts += torch.stack([parts.ce_sum.double(), parts.emo_sum.double(), parts.num_tokens.double()]).to(
            self._parts.device
        )

        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every rank's tokens, and DDP averages gradients over ranks: undo the average
            # exactly as Trainer.compute_loss does for models that take loss kwargs.
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, outputs) if return_outputs else loss

    def _hidden_states(self, model: nn.Module, decoder: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        """Run the (possibly wrapped) model and capture the decoder's final hidden states.

        Calling the outer wrapper, not the decoder alone, keeps DDP's gradient synchronisation and PEFT's adapters
        in play; ``logits_to_keep=1`` keeps the model's own head to one position per sequence.
        """
        captured: list[torch.Tensor] = []

        def capture(_module: nn.Module, _args: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

        handle = decoder.register_forward_hook(capture)
        try:
            extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
            outputs = model(**inputs, use_cache=False, **extra)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise ValueError(f"expected the decoder to run once per forward, it ran {len(captured)} times")
        return captured[0], outputs

    def _check_logits_come_from_head(self, hidden: torch.Tensor, head: nn.Module, outputs: Any) -> None:
        """Once: the model's last-position logits must equal ``head(hidden)``; models that soft-cap or rescale their
        logits after the head (Gemma 2, Cohere, Granite, ...) would otherwise train on a silently different loss."""
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        with torch.no_grad():
            ours = head(hidden[..., -1:, :]).float()
            theirs = logits[..., -1:, :].float()
            tol = 1e-4 if head.weight.dtype == torch.float32 else 3e-2
            if not torch.allclose(ours, theirs, rtol=tol, atol=tol * float(theirs.abs().max().clamp(min=1))):
                raise ValueError(
                    "the model transforms its logits after the output embedding (e.g. final_logit_softcapping or "
                    "logit scaling); EMOTrainer's fused loss would not match it"
                )
        self._head_checked = True

    def _current_cost(self, weight: torch.Tensor) -> torch.Tensor | None:
        if self.emo_cost == "adaptive":
            return None
        if self._cost_embedding is None:
            raise ValueError("the fixed EMO cost embedding is taken when training starts: call train() first")
        if self._cost_embedding.device != weight.device:
            self._cost_embedding = self._cost_embedding.to(weight.device)
        return self._cost_embedding

    # ------------------------------------------------------------------------------------ fixed cost: take and keep

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ):
        """:meth:`transformers.Trainer.train`; with ``emo_cost="fixed"`` the cost embedding is first restored from
        the checkpoint being resumed, or copied from the output embedding if training starts afresh."""
        if self.emo_cost == "fixed" and self._cost_embedding is None:
            checkpoint = resume_from_checkpoint
            if checkpoint is True:
                checkpoint = get_last_checkpoint(self.args.output_dir)
            if checkpoint:
                self._cost_embedding = load_cost_embedding(checkpoint)
            else:
                head = _decoder_and_head(unwrap_peft_model(self.model))[1]
                self._cost_embedding = head.weight.detach().clone()
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """:meth:`transformers.Trainer.save_model`, plus the fixed cost embedding (checkpoints included)."""
        super().save_model(output_dir, _internal_call)
        if self.emo_cost == "fixed" and self._cost_embedding is not None and self.args.should_save:
            from safetensors.torch import save_file

            output_dir = output_dir if output_dir is not None else self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            save_file(
                {"cost_embedding": self._cost_embedding.detach().cpu().contiguous()},
                os.path.join(output_dir, COST_EMBEDDING_FILE),
            )

    # ----------------------------------------------------------------------------------------- logging, optimizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds ``ce_loss`` and ``emo_loss`` (token means since the last training log) to training logs."""
        if "loss" in logs:  # training logs; evaluation logs use "eval_loss"
            totals = self._parts
            if self.accelerator.num_processes > 1:
                totals = self.accelerator.reduce(totals.clone(), reduction="sum")
            if totals[2] > 0:
                logs = {**logs, "ce_loss": (totals[0] / totals[2]).item(), "emo_loss": (totals[1] / totals[2]).item()}
            self._parts.zero_()
        super().log(logs, start_time)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, or Tiger with its per-kind parameter groups for ``optimizer="tiger"``."""
        if self.optimizer is None and self.emo_optimizer == "tiger":
            from .tiger import Tiger, tiger_param_groups

            opt_model = self.model if model is None else model
            groups = tiger_param_groups(opt_model, weight_decay=self.args.weight_decay)
            options = tiger_options(self.args.optim_args)
            self.optimizer = Tiger(groups, lr=self.args.learning_rate, weight_decay=self.args.weight_decay, **options)
            return self.optimizer
        return super().create_optimizer(model)


def load_cost_embedding(checkpoint_dir: str) -> torch.Tensor:
    """The fixed EMO cost embedding that :class:`EMOTrainer` saved in ``checkpoint_dir``.

    Raises:
        ValueError: the directory holds no ``emo_cost_embedding.safetensors``.
    """
    from safetensors.torch import load_file

    path = os.path.join(checkpoint_dir, COST_EMBEDDING_FILE)
    if not os.path.isfile(path):
        raise ValueError(
            f"{checkpoint_dir!r} has no {COST_EMBEDDING_FILE}: it was not saved by an EMOTrainer with a fixed cost; "
            "pass the cost embedding explicitly (emo_cost=<tensor>)"
        )
    return load_file(path)["cost_embedding"]


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The module whose output feeds the LM head, and the LM head; clear errors for models EMO cannot use."""
    get_head: Callable[[], Any] | None = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor) or head.weight.dim() != 2:
        raise ValueError(
            f"{type(model).__name__} has no output embeddings (get_output_embeddings() with a 2-D weight); "
            "EMOTrainer needs a causal LM head"
        )
    if hasattr(head, "base_layer"):  # a PEFT tuner layer: its .weight is the frozen base, the adapter would be lost
        raise ValueError(
            "the output embedding carries a PEFT adapter (LoRA on lm_head); leave lm_head out of target_modules "
            "(modules_to_save=['lm_head'] is supported)"
        )
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if get_decoder is not None else None
    if decoder is None or decoder is model:
        raise ValueError(f"{type(model).__name__} has no decoder body (get_decoder()); EMOTrainer needs a causal LM")
    return decoder, head
