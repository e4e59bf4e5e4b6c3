"""EMO loss from hidden states, forward + backward: fused (chunked) EMO vs the transformers cross-entropy path.

Cases (all fp32 on CPU, gradients w.r.t. hidden states and the output embedding):

* ``ce``: what a transformers causal LM does: ``lm_head`` matmul, then ``ForCausalLMLoss`` (float upcast,
  ``cross_entropy``), backward;
* ``fused``: ``fused_emo_loss(hidden, weight, labels, mode="mix")`` (adaptive cost = the weight itself);
* ``reference``: our unfused ``emo_loss`` on the materialised logits;
* ``official``: the official repository's computation pattern (one-hot matrices, ``q_final``, two dense
  ``[N, V] @ [V, D]`` products), written from the formula for comparison.

Targets (issue #5, N=8192, hidden 1024, vocab 32000): fused time <= 1.3x ce, fused peak memory <= 0.4x ce.
Run: ``flock /tmp/hf_su_bench.lock env PYTHONPATH=$PWD python -m benchmarks.emo``.
"""

from __future__ import annotations

import gc
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.harness import Report, Timing, bench_parser, peak_memory, time_fn
from hf_su.trainer.emo import default_chunk_size, emo_loss, fused_emo_loss

CASES = ("ce", "fused", "reference", "official")


def _official_style_emo(logits: torch.Tensor, labels: torch.Tensor, cost_embedding: torch.Tensor) -> torch.Tensor:
    """Mode 1 ("mix") computed the way the official code does it: every intermediate is a full [N, V] tensor."""
    mask = labels != -100
    safe = labels.masked_fill(~mask, 0)
    mle = F.cross_entropy(logits, labels, reduction="none")
    e_hat = cost_embedding / cost_embedding.norm(p=2, dim=-1, keepdim=True)
    one_hot = F.one_hot(safe, num_classes=logits.shape[-1]).to(logits.dtype)
    stable_one_hot = (one_hot + 1e-15) / (one_hot + 1e-15).sum(-1, keepdim=True)
    p_repr = stable_one_hot @ e_hat
    q = F.log_softmax(logits, dim=-1).exp()
    q_final = q - (q * one_hot).detach()
    emo = 1 - (p_repr * (q_final @ e_hat)).sum(-1)
    loss = 0.5 * ((mle / (emo + 1e-10)).detach() * emo + mle)
    return (loss * mask).sum() / (mask.sum() + 1e-15)


def make_case(case: str, n: int, hidden: int, vocab: int, chunk_size: int | None = None, seed: int = 0):
    """Inputs for one case; returns the zero-argument forward+backward callable (used by peak_memory too)."""
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, hidden, generator=gen)).requires_grad_(True)
    weight = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).requires_grad_(True)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.05] = -100

    def clear() -> None:
        h.grad = None
        weight.grad = None

    if case == "ce":
        from transformers.loss.loss_utils import fixed_cross_entropy

        def run() -> None:
            clear()
            logits = F.linear(h, weight).float()  # ForCausalLMLoss upcasts, then fixed_cross_entropy
            fixed_cross_entropy(logits, labels).backward()

    elif case == "fused":

        def run() -> None:
            clear()
            fused_emo_loss(h, weight, labels, mode="mix", chunk_size=chunk_size).backward()

    elif case == "reference":

        def run() -> None:
            clear()
            emo_loss(F.linear(h, weight), labels, weight, mode="mix").backward()

    elif case == "official":

        def run() -> None:
            clear()
            _official_style_emo(F.linear(h, weight), labels, weight.detach()).backward()

    else:
        raise ValueError(f"unknown case {case!r}; choose from {CASES}")
    return run


def _interleaved_timings(runs: dict, warmup: int, reps: dict) -> tuple[dict, dict]:
    """Wall-clock Timing and median process CPU seconds per case (``reps[case]`` timed runs after ``warmup``),
    repetitions interleaved across cases so that load from other jobs on a shared machine hits every case alike."""
    walls = {case: [] for case in runs}
    cpus = {case: [] for case in runs}
    for rep in range(warmup + max(reps.values())):
        for case, run in runs.items():
            if rep >= warmup + reps[case]:
                continue
            cpu_start = time.process_time()
            timing = time_fn(run, warmup=0, reps=1)
            if rep >= warmup:
                walls[case].append(timing.median)
                cpus[case].append(time.process_time() - cpu_start)
            gc.collect()
    wall = {c: Timing(statistics.median(t), min(t), max(t), len(t)) for c, t in walls.items()}
    return wall, {c: statistics.median(t) for c, t in cpus.items()}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.set_defaults(reps=3, warmup=1)  # one fp32 run of the unfused cases takes ~10-30 s on 2 cores
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--cases", default="ce,fused,official", help="comma-separated subset of " + ",".join(CASES))
    parser.add_argument("--unfused-reps", type=int, default=1, help="timed runs of the reference/official cases")
    args = parser.parse_args()
    if args.quick:
        args.n, args.hidden, args.vocab, args.reps, args.warmup = 1024, 256, 4000, 3, 1
    sizes = dict(n=args.n, hidden=args.hidden, vocab=args.vocab)
    chunk = args.chunk_size or default_chunk_size(args.n, args.hidden, args.vocab)
    cases = [c for c in args.cases.split(",") if c]
    if "ce" not in cases:
        parser.error("the ce case is the baseline of every ratio")

    runs = {case: make_case(case, chunk_size=chunk, seed=i, **sizes) for i, case in enumerate(cases)}
    reps = {case: args.reps if case in ("ce", "fused") else min(args.reps, args.unfused_reps) for case in cases}
    wall, cpu = _interleaved_timings(runs, args.warmup, reps)
    del runs
    gc.collect()
    peaks = {case: peak_memory("benchmarks.emo:make_case", case=case, chunk_size=chunk, **sizes) for case in cases}

    report = Report(
        f"EMO loss, forward+backward from hidden states (N={args.n}, hidden={args.hidden}, vocab={args.vocab}, "
        f"fp32, chunk={chunk})",
        columns=["case", "ms", "time vs ce", "cpu s", "cpu vs ce", "peak MiB", "memory vs ce", "target"],
    )
    for case in cases:
        report.add(
            case=case,
            ms=wall[case].ms,
            **{
                "time vs ce": wall[case] / wall["ce"],
                "cpu s": cpu[case],
                "cpu vs ce": cpu[case] / cpu["ce"],
                "peak MiB": peaks[case] / 2**20,
                "memory vs ce": peaks[case] / peaks["ce"],
                "target": "<= 1.3 time, <= 0.4 memory" if case == "fused" else "",
            },
        )
    report.notes.append(
        f"Medians of {args.reps} runs ({args.unfused_reps} for reference/official) after {args.warmup} warm-up, "
        "cases interleaved; cpu = process CPU seconds of "
        "the same runs (less sensitive to other jobs); peak = RSS high-water of one run in a fresh process. "
        "ce = lm_head + transformers fixed_cross_entropy; reference = our unfused emo_loss; official = the DRSY/EMO "
        "computation pattern (mode 1). The machine is shared with other jobs."
    )
    report.emit(args.json)


if __name__ == "__main__":
    main()
