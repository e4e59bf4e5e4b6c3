"""The main job end to end at tiny sizes: outputs, bad inputs, resume parity, 2-process DDP parity."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from hf_su.cli import main
from hf_su.pipeline import DEFAULT_LEARNING_RATES, SUMMARY_FILE, TrainSettings, split_documents, train_causal_lm
from hf_su.testing import run_torchrun

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A run of a few seconds: 60k characters of the embedded corpus, a 400-piece BytePiece vocabulary, the tiny preset.
TINY = dict(
    max_chars=60_000,
    vocab_size=400,
    model="tiny",
    seq_len=32,
    batch_size=4,
    max_steps=8,
    warmup_steps=2,
    eval_steps=4,
    save_steps=4,
    logging_steps=4,
    progress=False,
)
TINY_FLAGS = [
    "--max-chars",
    "60000",
    "--vocab-size",
    "400",
    "--model",
    "tiny",
    "--seq-len",
    "32",
    "--batch-size",
    "4",
    "--max-steps",
    "8",
    "--eval-steps",
    "4",
    "--save-steps",
    "4",
    "--no-progress",
]


def _weights(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("run") / "out")
    assert main(["train", "--output-dir", out, *TINY_FLAGS]) == 0
    return out


def test_train_writes_a_loadable_model_tokenizer_and_summary(trained_run):
    for name in ("config.json", "model.safetensors", "tokenizer.json", SUMMARY_FILE):
        assert os.path.isfile(os.path.join(trained_run, name)), name
    summary = json.load(open(os.path.join(trained_run, SUMMARY_FILE)))
    assert summary["global_step"] == 8 and summary["train_length"] == 32
    assert summary["eval_loss"] == pytest.approx(summary["log_history"][-1]["eval_loss"])
    model = AutoModelForCausalLM.from_pretrained(trained_run)
    tokenizer = AutoTokenizer.from_pretrained(trained_run)  # plain transformers
    ids = tokenizer("def f(x):\n    return x", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == len(tokenizer) == model.config.vocab_size


def test_train_hwfa_variant(tmp_path):
    out = str(tmp_path / "hwfa")
    assert main(["train", "--output-dir", out, *TINY_FLAGS, "--attention", "hwfa", "--hwfa-window", "8"]) == 0
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["hwfa"]["window"] == 8 and "sliding_attention" in config["layer_types"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data", "/nonexistent/file.txt"], "data file not found"),
        (["--attention", "hwfa", "--hwfa-window", "64", "--seq-len", "32"], "must be shorter than --seq-len"),
        (["--model", "/nonexistent-model-dir"], "neither a preset"),
        (["--resume"], "no checkpoints"),
    ],
)
def test_bad_inputs_fail_with_one_line_and_write_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert main(["train", "--output-dir", str(out), *TINY_FLAGS, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


def test_empty_corpus_and_non_causal_model(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["train", "--output-dir", str(tmp_path / "a"), *TINY_FLAGS, "--data", str(empty)]) == 2
    assert "corpus is empty" in capsys.readouterr().err
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    assert main(["train", "--output-dir", str(tmp_path / "b"), *TINY_FLAGS, "--model", str(vit)]) == 2
    assert "not a causal language model" in capsys.readouterr().err


def test_occupied_output_dir_is_not_touched(trained_run, capsys):
    before = _weights(trained_run)
    assert main(["train", "--output-dir", trained_run, *TINY_FLAGS]) == 2
    assert "not empty" in capsys.readouterr().err
    after = _weights(trained_run)
    assert all(torch.equal(before[k], after[k]) for k in before)


class _Crash(Exception):
    pass


class _CrashAfter(TrainerCallback):
    """Simulates a killed job: raise once step ``step`` has finished (its checkpoint, if any, is on disk)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step + 1:
            raise _Crash


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    full = str(tmp_path / "full")
    train_causal_lm(TrainSettings(output_dir=full, **TINY))
    broken = str(tmp_path / "broken")
    with pytest.raises(_Crash):
        train_causal_lm(TrainSettings(output_dir=broken, **TINY), callbacks=[_CrashAfter(4)])
    assert not os.path.exists(os.path.join(broken, SUMMARY_FILE))
    train_causal_lm(TrainSettings(output_dir=broken, resume=True, **TINY))
    expected, resumed = _weights(full), _weights(broken)
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)


def test_overwrite_replaces_only_after_success(trained_run, tmp_path):
    copy = str(tmp_path / "copy")
    train_causal_lm(TrainSettings(output_dir=copy, **TINY))
    train_causal_lm(TrainSettings(output_dir=copy, overwrite=True, **{**TINY, "max_steps": 4}))
    assert json.load(open(os.path.join(copy, SUMMARY_FILE)))["global_step"] == 4
    assert not os.path.exists(copy + ".partial")


class _OptimizerSpy(TrainerCallback):
    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it


def test_tiger_defaults_and_user_optim_args(tmp_path):
    """The job's Tiger gets DEFAULT_TIGER_OPTIONS (beta 0.9) and its default lr; the user's optim_args add or override."""
    spy = _OptimizerSpy()
    settings = TrainSettings(
        output_dir=str(tmp_path / "o"), **{**TINY, "max_steps": 1, "eval_steps": 1, "save_steps": 1}
    )
    train_causal_lm(settings, callbacks=[spy])
    assert type(spy.optimizer).__name__ == "Tiger"
    assert {(g["beta"], g["min_rms"]) for g in spy.optimizer.param_groups} == {(0.9, 1e-3)}
    assert spy.optimizer.defaults["lr"] == DEFAULT_LEARNING_RATES["tiger"]
    settings.output_dir, settings.tokenizer = str(tmp_path / "u"), str(tmp_path / "o")  # skip tokenizer training
    settings.extra_training_args = {"optim_args": "beta=0.95,min_rms=0.05"}
    train_causal_lm(settings, callbacks=[spy])
    assert {(g["beta"], g["min_rms"]) for g in spy.optimizer.param_groups} == {(0.95, 0.05)}


def test_optim_args_flag_reaches_the_settings(monkeypatch, tmp_path):
    import hf_su.pipeline

    seen: list[TrainSettings] = []

    def fake_train(settings):
        seen.append(settings)
        return {"parameters": 1, "global_step": 0, "eval_loss": 0.0}

    monkeypatch.setattr(hf_su.pipeline, "train_causal_lm", fake_train)
    assert main(["train", "--output-dir", str(tmp_path / "a"), "--optim-args", "beta=0.965,min_rms=0.05"]) == 0
    assert main(["train", "--output-dir", str(tmp_path / "b")]) == 0
    assert [s.extra_training_args for s in seen] == [{"optim_args": "beta=0.965,min_rms=0.05"}, {}]


def test_split_documents_is_deterministic_and_disjoint():
    docs = [f"doc {i}" for i in range(40)]
    train, held = split_documents(docs, 0.1)
    assert len(held) == 4 and not set(train) & set(held) and len(train) + len(held) == 40
    assert split_documents(docs, 0.1) == (train, held)


@pytest.mark.distributed
def test_two_process_ddp_matches_single_process(tmp_path):
    """2 gloo ranks with per-device batch 2 take the same steps as 1 process with batch 4 (same global batch)."""
    flags = [*TINY_FLAGS, "--max-steps", "4", "--eval-steps", "4", "--save-steps", "4"]
    single = str(tmp_path / "single")
    assert main(["train", "--output-dir", single, *flags, "--batch-size", "4"]) == 0
    ddp = str(tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT}
    # --overwrite: a retried run (see run_torchrun) starts again from an empty folder
    run_torchrun(["-m", "hf_su", "train", "--output-dir", ddp, *flags, "--batch-size", "2", "--overwrite"], env=env)
    expected, got = _weights(single), _weights(ddp)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_generate_continues_the_exact_prompt(trained_run, capsys):
    assert main(["generate", trained_run, "def __in", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def __in")
    assert main(["generate", "/nonexistent", "x"]) == 2


def test_tokenizer_train_convert_encode(tmp_path, capsys):
    model_file = str(tmp_path / "bp.model")
    assert main(["tokenizer", "train", "--max-chars", "30000", "--vocab-size", "300", "--output", model_file]) == 0
    assert main(["tokenizer", "convert", model_file, str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    text = "print(hello_world)"
    assert main(["tokenizer", "encode", model_file, text]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert main(["tokenizer", "encode", str(tmp_path / "hf"), text, "--alpha", "0.1", "--seed", "0"]) == 0
    sampled = json.loads(capsys.readouterr().out)
    assert "".join(from_file["pieces"]) == "".join(sampled["pieces"]) == text
    assert from_file["ids"] == AutoTokenizer.from_pretrained(str(tmp_path / "hf"))(text)["input_ids"]
    assert main(["tokenizer", "convert", str(tmp_path / "missing.model"), str(tmp_path / "x")]) == 2
