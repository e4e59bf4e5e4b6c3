"""Length-extrapolation evaluation: loss and next-token accuracy of one trained model at several context lengths,
under several position-handling methods applied at inference time.

Methods (each a fresh copy of the model, so they never interfere):

* ``rope``: the model as trained (for an HWFA model, its window layers plus full layers with RoPE);
* ``rerope``: :func:`hf_su.patch_rerope` with window ``w`` and log-n scaling (Su's "ReRoPE-w-log n†");
* ``leaky_rerope``: Leaky ReRoPE, window ``w/2`` and the slope ``1/k`` chosen by Su's rule so that the largest
  evaluated distance maps inside half the training length;
* ``ntk_dynamic`` and ``yarn``: transformers' own rope scaling (``rope_parameters``), factor = longest length /
  training length;
* ``hwfa_rerope`` (HWFA models only): ReRoPE on the full layers, the window layers unchanged.

The metric is computed over every position of each evaluation window (as in Su's tables) and, separately, over the
positions beyond the training length (``tail_*``), where the methods differ most.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch/transformers are imported where used, so `hf-su --help` stays fast
    import torch
    from transformers import PreTrainedModel

METHODS = ("rope", "rerope", "leaky_rerope", "ntk_dynamic", "yarn", "hwfa_rerope")


@dataclass(frozen=True)
class LengthResult:
    """Metrics of one method at one evaluation length."""

    method: str
    length: int
    loss: float
    accuracy: float
    tail_loss: float | None
    tail_accuracy: float | None
    windows: int


def evaluation_windows(token_ids: torch.Tensor, length: int, max_windows: int) -> torch.Tensor:
    """Cut a 1-D token stream into up to ``max_windows`` non-overlapping windows of ``length`` tokens ``[W, length]``.

    Raises:
        ValueError: the stream is shorter than one window.
    """
    available = token_ids.numel() // length
    if available == 0:
        raise ValueError(f"the evaluation text has {token_ids.numel()} tokens, fewer than one window of {length}")
    count = min(available, max_windows)
    return token_ids[: count * length].view(count, length)


def window_metrics(
    model: PreTrainedModel, windows: torch.Tensor, *, train_length: int, batch_size: int = 1
) -> dict[str, float | None]:
    """Mean next-token loss and accuracy over all predicted positions, and over positions past ``train_length``."""
    import torch

    with torch.no_grad():
        return _window_metrics(model, windows, train_length, batch_size)


def _window_metrics(model, windows, train_length: int, batch_size: int) -> dict[str, float | None]:
    import torch

    device = next(model.parameters()).device
    sums = {"loss": 0.0, "correct": 0.0, "count": 0, "tail_loss": 0.0, "tail_correct": 0.0, "tail_count": 0}
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        correct = (logits.argmax(-1) == targets).float()
        sums["loss"] += losses.sum().item()
        sums["correct"] += correct.sum().item()
        sums["count"] += targets.numel()
        # position t predicts token t + 1; the tail holds the predictions made with more than train_length context
        tail = slice(train_length, None)
        sums["tail_loss"] += losses[:, tail].sum().item()
        sums["tail_correct"] += correct[:, tail].sum().item()
        sums["tail_count"] += losses[:, tail].numel()
    tail_count = sums["tail_count"]
    return {
        "loss": sums["loss"] / sums["count"],
        "accuracy": sums["correct"] / sums["count"],
        "tail_loss": sums["tail_loss"] / tail_count if tail_count else None,
        "tail_accuracy": sums["tail_correct"] / tail_count if tail_count else None,
    }


def is_hwfa_model(model: PreTrainedModel) -> bool:
    """True for a model built from :func:`hf_su.hwfa_config` (window layers plus a few full layers)."""
    return getattr(model.config, "hwfa", None) is not None


def _leaky_setting(window: int, train_length: int, max_length: int) -> tuple[int, float]:
    """Su's rule: window w/2 and the smallest slope k with ``w' + (max_length - 1 - w') / k <= train_length / 2``."""
    leaky_window = max(1, window // 2)
    room = train_length / 2 - leaky_window
    if room <= 0:
        raise ValueError(f"leaky ReRoPE needs window/2 < train_length/2; got window {window}, train {train_length}")
    return leaky_window, max(2.0, math.ceil((max_length - 1 - leaky_window) / room))


def load_for_method(
    model_path: str,
    method: str,
    *,
    train_length: int,
    max_length: int,
    window: int,
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """Load ``model_path`` and apply one method of :data:`METHODS`; raises ValueError for an unknown or unfit one."""
    from transformers import AutoConfig

    from .modeling.hwfa import load_causal_lm

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    overrides: dict = {"dtype": dtype} if dtype is not None else {}
    if method in ("ntk_dynamic", "yarn"):
        config = AutoConfig.from_pretrained(model_path)
        params = dict(config.rope_parameters)
        factor = max(1.0, max_length / train_length)
        if method == "ntk_dynamic":
            params.update(rope_type="dynamic", factor=factor)
            # dynamic NTK rescales once the sequence passes max_position_embeddings: make that the training length
            overrides["max_position_embeddings"] = train_length
        else:
            params.update(rope_type="yarn", factor=factor, original_max_position_embeddings=train_length)
            overrides["max_position_embeddings"] = max(max_length, train_length)
        overrides["rope_parameters"] = params
    model = load_causal_lm(model_path, **overrides).eval()
    if method == "hwfa_rerope" and not is_hwfa_model(model):
        raise ValueError("method 'hwfa_rerope' needs an HWFA model (built with hwfa_config)")
    if method in ("rerope", "hwfa_rerope"):
        from .modeling.rerope import patch_rerope

        patch_rerope(model, window=window, log_scale_base=train_length)
    elif method == "leaky_rerope":
        from .modeling.rerope import patch_rerope

        leaky_window, slope = _leaky_setting(window, train_length, max_length)
        patch_rerope(model, window=leaky_window, leaky=slope, log_scale_base=train_length)
    return model


def evaluate_lengths(
    model_path: str,
    token_ids: torch.Tensor,
    *,
    train_length: int,
    lengths: Sequence[int],
    methods: Iterable[str] | None = None,
    window: int | None = None,
    max_windows: int = 8,
    batch_size: int = 1,
    progress: bool = True,
) -> list[LengthResult]:
    """Evaluate each method at each length on windows cut from ``token_ids`` (a 1-D held-out token stream).

    Every length is scored on the same text: the stream is first cut to ``max_windows`` windows of the longest length
    (fewer if it is shorter), and each length splits that span into its own windows, so a difference between
    lengths comes from the context length, not from different text.

    ``methods=None`` takes every method that applies: ``hwfa_rerope`` instead of ``rerope`` for HWFA models (there
    the two are the same patch), ``rerope`` alone otherwise. ``window`` defaults to half the training length for
    ReRoPE (Su: 1/4 to 1/2 of it).
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoConfig

    if not lengths or min(lengths) < 2:
        raise ValueError(f"lengths must be a non-empty list of integers >= 2, got {lengths}")
    window = window if window is not None else max(1, train_length // 2)
    if not 1 <= window < train_length:
        raise ValueError(
            f"the ReRoPE window must be in [1, train_length); got {window} for train length {train_length}"
        )
    token_ids = torch.as_tensor(token_ids).flatten()
    longest = max(lengths)
    span = evaluation_windows(token_ids, longest, max_windows).numel()
    token_ids = token_ids[:span]
    if methods is None:
        # on an HWFA model ReRoPE patches only the full layers: that is hwfa_rerope, listed once under that name
        hwfa = getattr(AutoConfig.from_pretrained(model_path), "hwfa", None) is not None
        skip = "rerope" if hwfa else "hwfa_rerope"
        methods = [m for m in METHODS if m != skip]
    methods = list(methods)
    results = []
    jobs = [(method, length) for method in methods for length in lengths]
    bar = tqdm(jobs, desc="eval-length", disable=not progress)
    loaded: dict[str, PreTrainedModel] = {}
    for method, length in bar:
        bar.set_postfix(method=method, length=length)
        if method not in loaded:
            loaded.clear()
            loaded[method] = load_for_method(
                model_path, method, train_length=train_length, max_length=max(lengths), window=window
            )
        windows = evaluation_windows(token_ids, length, span // length)
        metrics = window_metrics(loaded[method], windows, train_length=train_length, batch_size=batch_size)
        results.append(LengthResult(method=method, length=length, windows=windows.shape[0], **metrics))
    return results


def results_table(results: Sequence[LengthResult], metric: str = "loss") -> str:
    """A markdown table: one row per method, one column per length, cells = ``metric`` (e.g. loss, tail_accuracy)."""
    lengths = sorted({r.length for r in results})
    methods = list(dict.fromkeys(r.method for r in results))
    cell = {(r.method, r.length): getattr(r, metric) for r in results}
    lines = [f"| {metric} | " + " | ".join(str(n) for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for method in methods:
        values = (cell.get((method, n)) for n in lengths)
        lines.append(f"| {method} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in values) + " |")
    return "\n".join(lines)


def plot_results(results: Sequence[LengthResult], path: str, *, train_length: int, metric: str = "loss") -> None:
    """Write a PNG: ``metric`` against evaluation length (log2 axis), one line per method, training length marked."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r.method for r in results):
        points = sorted((r.length, getattr(r, metric)) for r in results if r.method == method)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    ax.axvline(train_length, color="grey", linestyle="--", linewidth=1, label="training length")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_to_dicts(results: Sequence[LengthResult]) -> list[dict]:
    return [asdict(r) for r in results]


__all__ = [
    "METHODS",
    "LengthResult",
    "evaluate_lengths",
    "evaluation_windows",
    "load_for_method",
    "plot_results",
    "results_table",
    "window_metrics",
]
