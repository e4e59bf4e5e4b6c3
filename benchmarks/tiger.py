"""Tiger optimizer benchmark (issue 6): step time and state memory against AdamW, and step-in-backward memory.

1. Optimizer step on ~100M fp32 parameters in ~200 tensors (fixed random gradients): hf_su Tiger (multi-tensor and
   per-tensor) against ``torch.optim.AdamW(foreach=True)``, with ``pytorch_optimizer.Tiger`` and ``lion_pytorch.Lion``
   beside them; optimizer state bytes of each. Targets: step time <= 1.0x AdamW (stretch 0.8x), state = 0.5x AdamW.
2. Peak memory (fresh subprocess, RSS high-water above the set-up) of one training step of a small Llama-style model:
   ordinary ``backward(); step(); zero_grad()`` against ``Tiger(step_in_backward=True)``, where each gradient is
   folded into the momentum during backward and freed at once.

Run: ``flock /tmp/hf_su_bench.lock env PYTHONPATH=$PWD python -m benchmarks.tiger``
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable

import torch

from benchmarks.harness import Report, bench_parser, peak_memory, time_fn
from hf_su.trainer.tiger import Tiger, tiger_param_groups


def _parameters(n_matrices: int, rows: int, cols: int, n_vectors: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(rows, cols)] * n_matrices + [(rows,)] * n_vectors
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        p.grad = torch.randn(shape, generator=gen)
        params.append(p)
    return params


def _optimizers() -> dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]]:
    from lion_pytorch import Lion
    from pytorch_optimizer import Tiger as PoTiger

    return {
        "hf_su Tiger (foreach)": lambda ps: Tiger(ps, lr=1e-3),
        "hf_su Tiger (per-tensor)": lambda ps: Tiger(ps, lr=1e-3, foreach=False),
        "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=True),
        "pytorch_optimizer Tiger (foreach)": lambda ps: PoTiger(ps, lr=1e-3, foreach=True),
        "lion_pytorch Lion": lambda ps: Lion(ps, lr=1e-4, weight_decay=0.01),
    }


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def _small_llama(hidden: int, layers: int = 4, vocab: int = 8192) -> torch.nn.Module:
    from hf_su.testing import tiny_causal_lm

    return tiny_causal_lm(
        "llama",
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=vocab,
    ).train()


def make_training_step(mode: str, hidden: int = 512, seq: int = 64) -> Callable[[], None]:
    """Set-up for the peak-memory subprocess: a small Llama, its optimizer state allocated, one step to measure."""
    torch.set_num_threads(1)
    model = _small_llama(hidden)
    vocab = model.config.vocab_size
    opt = Tiger(
        tiger_param_groups(model), lr=1e-3, step_in_backward=mode == "step_in_backward", foreach=mode != "per_tensor"
    )
    ids = torch.randint(3, vocab, (1, seq), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    step()  # warm-up: the momentum exists and one-time allocations are done before measuring
    return step


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.quick:
        n_matrices, rows, cols, n_vectors, hidden = 24, 512, 256, 8, 128
    else:
        n_matrices, rows, cols, n_vectors, hidden = 192, 1024, 512, 8, 512
    params = _parameters(n_matrices, rows, cols, n_vectors)
    n_params = sum(p.numel() for p in params)

    timings, states = {}, {}
    for name, build in _optimizers().items():
        opt = build(params)
        timings[name] = time_fn(opt.step, warmup=args.warmup, reps=args.reps)
        states[name] = _state_bytes(opt)
        del opt
        gc.collect()

    adamw = "torch AdamW (foreach)"
    report = Report(
        f"Tiger optimizer step, fp32, {n_params / 1e6:.1f}M parameters in {len(params)} tensors",
        columns=["optimizer", "step ms", "time vs AdamW", "state MB", "state vs AdamW", "target"],
    )
    for name in timings:
        target = "time <= 1.0 (0.8 stretch), state 0.5" if name == "hf_su Tiger (foreach)" else ""
        report.add(
            optimizer=name,
            **{
                "step ms": timings[name].ms,
                "time vs AdamW": timings[name] / timings[adamw],
                "state MB": states[name] / 2**20,
                "state vs AdamW": states[name] / states[adamw],
                "target": target,
            },
        )
    report.notes.append(
        f"Medians of {args.reps} steps after {args.warmup} warm-up steps, {args.threads} torch thread(s), all in one "
        "process on a machine shared with other jobs. hf_su Tiger applies its per-kind rule (matrices: lr x RMS, "
        "vectors: 0.5 lr, NaN/Inf test); the other Tigers and Lion are bare sign updates."
    )
    report.emit(args.json)
    del params
    gc.collect()

    # Fixed mmap threshold: freed tensors go back to the OS, so RSS high-water marks compare fairly.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    memory = Report(
        "Peak memory of one training step: ordinary step vs step-in-backward",
        columns=["mode", "peak MB above set-up", "vs ordinary (foreach)"],
    )
    peaks = {
        mode: peak_memory("benchmarks.tiger:make_training_step", mode=mode, hidden=hidden)
        for mode in ("ordinary", "per_tensor", "step_in_backward")
    }
    for mode, peak in peaks.items():
        memory.add(
            mode=mode, **{"peak MB above set-up": peak / 2**20, "vs ordinary (foreach)": peak / peaks["ordinary"]}
        )
    model_params = sum(p.numel() for p in _small_llama(hidden).parameters())
    memory.notes.append(
        f"Llama-style model with {model_params / 1e6:.1f}M fp32 parameters ({model_params * 4 / 2**20:.0f} MB), "
        "batch 1 x 64 tokens, after one warm-up step (momentum allocated). Ordinary = backward(); step(); zero_grad(); "
        "per_tensor = the same with foreach=False; RSS high-water with MALLOC_MMAP_THRESHOLD_=65536 so freed "
        "tensors return to the OS."
    )
    memory.emit(args.json.replace(".json", "_memory.json") if args.json else None)


if __name__ == "__main__":
    main()
