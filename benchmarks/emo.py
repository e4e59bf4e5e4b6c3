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

import torch
import torch.nn.functional as F

from benchmarks.harness import Report, bench_parser, peak_memory, time_fn
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


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    args = parser.parse_args()
    if args.quick:
        args.n, args.hidden, args.vocab, args.reps, args.warmup = 1024, 256, 4000, 3, 1
    sizes = dict(n=args.n, hidden=args.hidden, vocab=args.vocab)
    chunk = args.chunk_size or default_chunk_size(args.n, args.hidden, args.vocab)
    cases = [c for c in args.cases.split(",") if c]

    timings, peaks = {}, {}
    for case in cases:  # one at a time: the unfused cases need several GiB each
        run = make_case(case, chunk_size=chunk, **sizes)
        timings[case] = time_fn(run, warmup=args.warmup, reps=args.reps)
        del run
        gc.collect()
        peaks[case] = peak_memory("benchmarks.emo:make_case", case=case, chunk_size=chunk, **sizes)

    report = Report(
        f"EMO loss, forward+backward from hidden states (N={args.n}, hidden={args.hidden}, vocab={args.vocab}, "
        f"fp32, chunk={chunk})",
        columns=["case", "ms", "time vs ce", "peak MiB", "memory vs ce", "target"],
    )
    targets = {"fused": ("<= 1.3x time, <= 0.4x memory")}
    for case in cases:
        report.add(
            case=case,
            ms=timings[case].ms,
            **{
                "time vs ce": timings[case] / timings["ce"] if "ce" in timings else float("nan"),
                "peak MiB": peaks[case] / 2**20,
                "memory vs ce": peaks[case] / peaks["ce"] if "ce" in peaks else float("nan"),
                "target": targets.get(case, ""),
            },
        )
    report.notes.append(
        f"Medians of {args.reps} runs after {args.warmup} warm-up; peak = RSS high-water of the callable in a fresh "
        "process. ce = lm_head + transformers fixed_cross_entropy; official = the DRSY/EMO computation pattern "
        "(mode 1). The machine is shared with other jobs."
    )
    report.emit(args.json)


if __name__ == "__main__":
    main()
