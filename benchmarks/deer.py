"""DEER / quasi-DEER GRU evaluation vs a Python loop over the same cell vs torch.nn.GRU (issue 11).

Batch 8, input size 16, fp32, inference (no grad) unless noted. "loop" runs the very cell DEER uses
(hf_su.modeling.deer.gru_cell, input projection precomputed) step by step in Python; "nn.GRU" is torch's fused
sequential kernel (C++ on CPU, cuDNN on GPU). "quasi" is ParallelGRU's path: diagonal Jacobians from the fused
gru_cell_and_diagonal; "quasi-probe" the generic path of deer_rnn (diagonal from H forward-mode probes);
"newton" full Jacobians. Every DEER row is checked against the loop. Target: loop / quasi >= 3 at T=16k, H=16.
On CPU, DEER iterates on the start states of ~32-step chunks that are integrated exactly (multiple shooting, see
hf_su.modeling.deer); "iters" counts those Newton steps. On GPU every chunk is one step (plain DEER).
The training table also times "plain adj.": the same forward with plain DEER's adjoint (full-sequence VJPs of the
cell by autograd, preconditioned scans over all steps; the backward pass before the chunked adjoint).

    flock /tmp/hf_su_bench.lock env PYTHONPATH=$PWD python -m benchmarks.deer --reps 3   # CPU, 1 thread
    flock /tmp/hf_su_bench.lock env PYTHONPATH=$PWD python -m benchmarks.deer --train-only --reps 10
    PYTHONPATH=$PWD python -m benchmarks.deer --device cuda --lengths 1024 16384 65536 262144
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

import hf_su.modeling.deer as deer_module
from benchmarks.harness import Report, bench_parser, time_fn
from hf_su.modeling.deer import deer_rnn, gru_cell, gru_cell_and_diagonal

BATCH, INPUT = 8, 16
# Generic Jacobians (H forward-mode probes per step, dense [H, H] products for Newton) cost seconds per case on a
# small CPU up to these sizes (chunk transitions are computed on the first sweep, and again only when one stalls).
NEWTON_MAX_T_H2 = 4096 * 64 * 64
PROBE_MAX_TH = 4096 * 64


def make_case(hidden: int, length: int, device: str):
    gru = nn.GRU(INPUT, hidden, batch_first=True, device=device)
    x = torch.randn(BATCH, length, INPUT, device=device)
    h0 = torch.zeros(BATCH, hidden, device=device)
    project = partial(nn.functional.linear, weight=gru.weight_ih_l0, bias=gru.bias_ih_l0)
    cell = partial(gru_cell, weight_hh=gru.weight_hh_l0, bias_hh=gru.bias_hh_l0)
    fused = partial(gru_cell_and_diagonal, weight_hh=gru.weight_hh_l0, bias_hh=gru.bias_hh_l0)

    def loop():
        gates_x, h, out = project(x), h0, []
        for t in range(length):
            h = cell(h, gates_x[:, t])
            out.append(h)
        return torch.stack(out, dim=1)

    runs = {
        "loop": loop,
        "nn.GRU": lambda: gru(x)[0],
        "quasi": lambda: deer_rnn(cell, project(x), h0, mode="quasi", cell_and_diagonal=fused, return_info=True),
        "quasi-probe": lambda: deer_rnn(cell, project(x), h0, mode="quasi", return_info=True),
        "newton": lambda: deer_rnn(cell, project(x), h0, mode="newton", return_info=True),
    }
    return gru, x, runs


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the machine is shared)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--no-train", action="store_true", help="skip the forward+backward table")
    parser.add_argument("--train-only", action="store_true", help="only the forward+backward table")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.lengths, args.reps = [16], [256, 1024], 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    on_cpu = args.device == "cpu"
    if args.train_only:
        train_table(args)
        return

    report = Report(
        f"DEER GRU inference, batch {BATCH}, fp32, {args.device}",
        columns=[
            "H",
            "T",
            "loop ms",
            "nn.GRU ms",
            "quasi ms",
            "quasi-probe ms",
            "newton ms",
            "loop/quasi",
            "loop/newton",
            "nn.GRU/quasi",
            "iters q/n",
            "max err q/n",
        ],
    )
    for hidden in args.hidden:
        for length in args.lengths:
            _, _, runs = make_case(hidden, length, args.device)
            big = length * hidden >= 16384 * 16
            reps, warmup = (1, 1) if big else (args.reps, args.warmup)
            with torch.no_grad():
                reference = runs["loop"]()
                times, iters, errs = {}, {}, {}
                for name, fn in runs.items():
                    skip = (name == "newton" and length * hidden * hidden > NEWTON_MAX_T_H2 and on_cpu) or (
                        name == "quasi-probe" and length * hidden > PROBE_MAX_TH and on_cpu
                    )
                    if skip:
                        continue
                    times[name] = time_fn(fn, warmup=warmup, reps=reps)
                    if name in ("quasi", "newton"):
                        out, info = fn()
                        iters[name], errs[name] = info.iterations, float((out - reference).abs().max())
            ms = {name: t.ms for name, t in times.items()}
            report.add(
                H=hidden,
                T=length,
                **{f"{n} ms": ms.get(n, "-") for n in runs},
                **{
                    "loop/quasi": ms["loop"] / ms["quasi"],
                    "loop/newton": ms["loop"] / ms["newton"] if "newton" in ms else "-",
                    "nn.GRU/quasi": ms["nn.GRU"] / ms["quasi"],
                    "iters q/n": f"{iters['quasi']}/{iters.get('newton', '-')}",
                    "max err q/n": f"{errs['quasi']:.1e}/{errs['newton']:.1e}"
                    if "newton" in errs
                    else f"{errs['quasi']:.1e}/-",
                },
            )
            print(report.rows[-1], flush=True)
    report.notes.append(
        f"torch threads: {args.threads}; '-' = not run (CPU: newton beyond T*H^2 = {NEWTON_MAX_T_H2}, "
        f"generic probes beyond T*H = {PROBE_MAX_TH}). Ratios > 1 mean DEER is faster."
    )
    report.emit(args.json)
    if not args.no_train:
        train_table(args)


@contextmanager
def plain_adjoint():
    """Backward passes inside use plain DEER's adjoint (one-step chunks) and autograd VJPs of the cell."""
    problem = deer_module._Problem
    saved = problem.solve_adjoint, problem.vjp
    problem.solve_adjoint = lambda self, h_prev, grad, chunks: self._stepwise_adjoint(h_prev, grad)
    problem.vjp = lambda self, h_prev, x, check=False: deer_module._slab_vjp(self.cell, h_prev, x)
    try:
        yield
    finally:
        problem.solve_adjoint, problem.vjp = saved


def train_table(args) -> None:
    """Forward + backward (gradients for every GRU weight and the inputs), H=16."""
    report = Report(
        f"DEER GRU training step (forward+backward), H=16, batch {BATCH}, fp32, {args.device}",
        columns=["T", "loop ms", "nn.GRU ms", "quasi ms", "plain adj. ms", "loop/quasi", "nn.GRU/quasi", "plain/quasi"],
    )
    from hf_su.modeling.deer import ParallelGRU

    for length in [t for t in args.lengths if t <= 4096]:
        gru = nn.GRU(INPUT, 16, batch_first=True, device=args.device)
        ours = ParallelGRU.from_gru(gru, mode="quasi")
        x = torch.randn(BATCH, length, INPUT, device=args.device, requires_grad=True)
        cell = partial(gru_cell, weight_hh=gru.weight_hh_l0, bias_hh=gru.bias_hh_l0)

        def loop_step(gru=gru, x=x, cell=cell, length=length):
            gates_x = nn.functional.linear(x, gru.weight_ih_l0, gru.bias_ih_l0)
            h, out = x.new_zeros(BATCH, 16), []
            for t in range(length):
                h = cell(h, gates_x[:, t])
                out.append(h)
            torch.stack(out, dim=1).square().sum().backward()

        def fused_step(module, x=x):
            module(x)[0].square().sum().backward()

        def plain_step(module=ours, x=x):
            with plain_adjoint():
                fused_step(module, x)

        reps = args.reps
        times = {
            "loop": time_fn(loop_step, warmup=1, reps=reps),
            "nn.GRU": time_fn(partial(fused_step, gru), warmup=1, reps=reps),
            "quasi": time_fn(partial(fused_step, ours), warmup=1, reps=reps),
            "plain adj.": time_fn(plain_step, warmup=1, reps=reps),
        }
        report.add(
            T=length,
            **{f"{n} ms": t.ms for n, t in times.items()},
            **{
                "loop/quasi": times["loop"] / times["quasi"],
                "nn.GRU/quasi": times["nn.GRU"] / times["quasi"],
                "plain/quasi": times["plain adj."] / times["quasi"],
            },
        )
    report.emit(None)


if __name__ == "__main__":
    main()
