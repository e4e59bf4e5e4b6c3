"""Length-extrapolation evaluation: methods are applied as documented and metrics equal a direct computation."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hf_su.eval_length import (
    METHODS,
    _leaky_setting,
    evaluate_lengths,
    evaluation_windows,
    load_for_method,
    plot_results,
    results_table,
    window_metrics,
)
from hf_su.modeling.hwfa import hwfa_config
from hf_su.testing import tiny_causal_lm, tiny_config

TRAIN = 16


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("m"))
    tiny_causal_lm("llama", max_position_embeddings=TRAIN).save_pretrained(path)
    return path


def test_window_metrics_equal_a_direct_computation(saved_model):
    model = load_for_method(saved_model, "rope", train_length=TRAIN, max_length=32, window=8)
    windows = torch.randint(3, 512, (3, 32))
    got = window_metrics(model, windows, train_length=TRAIN, batch_size=2)
    logits = model(windows).logits[:, :-1]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")
    correct = (logits.argmax(-1) == windows[:, 1:]).float()
    assert got["loss"] == pytest.approx(losses.mean().item(), rel=1e-5)
    assert got["accuracy"] == pytest.approx(correct.mean().item())
    assert got["tail_loss"] == pytest.approx(losses[:, TRAIN:].mean().item(), rel=1e-5)


def test_methods_apply_the_documented_patches(saved_model):
    rerope = load_for_method(saved_model, "rerope", train_length=TRAIN, max_length=64, window=8)
    assert rerope.config.rerope == {"window": 8, "leaky": None, "log_scale_base": TRAIN}
    leaky = load_for_method(saved_model, "leaky_rerope", train_length=TRAIN, max_length=64, window=8)
    window, slope = _leaky_setting(8, TRAIN, 64)
    assert leaky.config.rerope == {"window": window, "leaky": slope, "log_scale_base": TRAIN}
    assert window + (64 - 1 - window) / slope <= TRAIN / 2  # Su's rule for choosing k
    yarn = load_for_method(saved_model, "yarn", train_length=TRAIN, max_length=64, window=8)
    assert yarn.config.rope_parameters["rope_type"] == "yarn" and yarn.config.rope_parameters["factor"] == 4
    ntk = load_for_method(saved_model, "ntk_dynamic", train_length=TRAIN, max_length=64, window=8)
    assert ntk.config.rope_parameters["rope_type"] == "dynamic" and ntk.config.max_position_embeddings == TRAIN
    with pytest.raises(ValueError, match="needs an HWFA model"):
        load_for_method(saved_model, "hwfa_rerope", train_length=TRAIN, max_length=64, window=8)
    with pytest.raises(ValueError, match="unknown method"):
        load_for_method(saved_model, "alibi", train_length=TRAIN, max_length=64, window=8)


def test_evaluate_lengths_table_and_plot(saved_model, tmp_path):
    ids = torch.randint(3, 512, (400,))
    results = evaluate_lengths(saved_model, ids, train_length=TRAIN, lengths=[16, 32], max_windows=2, progress=False)
    assert {r.method for r in results} == set(METHODS) - {"hwfa_rerope"}
    by_key = {(r.method, r.length): r for r in results}
    # when every distance is inside the window (length <= w) ReRoPE is RoPE, so the two must agree
    short = evaluate_lengths(
        saved_model, ids, train_length=TRAIN, lengths=[8], methods=["rope", "rerope"], max_windows=2, progress=False
    )
    assert short[0].loss == pytest.approx(short[1].loss, rel=1e-6)
    assert by_key[("rope", 16)].tail_loss is None and by_key[("rope", 32)].tail_loss is not None
    table = results_table(results, "loss")
    assert table.splitlines()[0] == "| loss | 16 | 32 |" and "| leaky_rerope |" in table
    plot_results(results, str(tmp_path / "p.png"), train_length=TRAIN)
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_hwfa_models_get_the_hwfa_rerope_method(tmp_path):
    config = hwfa_config(tiny_config("llama", max_position_embeddings=TRAIN, num_hidden_layers=3), window=4)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    results = evaluate_lengths(
        str(tmp_path),
        torch.randint(3, 512, (200,)),
        train_length=TRAIN,
        lengths=[32],
        max_windows=1,
        progress=False,
        methods=None,
    )
    assert "hwfa_rerope" in {r.method for r in results} and "rerope" not in {r.method for r in results}
    # a fresh process that never imported hf_su.modeling.hwfa (e.g. evaluating a model trained elsewhere) loads it too
    code = (
        "from hf_su.eval_length import load_for_method; "
        f"load_for_method({str(tmp_path)!r}, 'hwfa_rerope', train_length={TRAIN}, max_length=32, window=4)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_errors():
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluation_windows(torch.arange(10), 16, 4)
    with pytest.raises(ValueError, match="lengths must be"):
        evaluate_lengths("unused", torch.arange(10), train_length=16, lengths=[])


def test_every_length_scores_the_same_text(saved_model):
    """Shorter lengths split the span of the longest length's windows, so lengths differ only in context."""
    ids = torch.randint(3, 512, (150,))
    results = evaluate_lengths(
        saved_model, ids, train_length=TRAIN, lengths=[16, 32, 64], methods=["rope"], max_windows=2, progress=False
    )
    assert {r.length: r.windows for r in results} == {16: 8, 32: 4, 64: 2}
