"""Shared benchmark helpers: timing with warm-up and medians, peak memory in a fresh subprocess, markdown/JSON tables.

A benchmark script measures ours and the baseline *in the same run* and reports their ratio, so the numbers are
comparable even on a busy or throttled machine. Typical use::

    from benchmarks.harness import Report, bench_parser, peak_memory, time_fn

    args = bench_parser(__doc__).parse_args()
    report = Report("ReRoPE prefill attention", columns=["case", "ours ms", "SDPA ms", "ratio", "target"])
    ours, base = time_fn(run_ours, reps=args.reps), time_fn(run_sdpa, reps=args.reps)
    report.add(case="n=8192", **{"ours ms": ours.ms, "SDPA ms": base.ms, "ratio": ours / base, "target": "<= 1.3"})
    report.emit(args.json)

Peak memory: ``peak_memory("benchmarks.bench_x:make_case", n=16384)`` imports the module in a new Python process,
calls ``make_case(n=16384)`` (the set-up: inputs, model), which returns a zero-argument callable; the peak memory
of that callable alone (the process's resident-set high-water mark, reset after set-up; or CUDA's
``max_memory_allocated`` on a GPU) is returned in bytes.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated runs of one callable."""

    median: float
    min: float
    max: float
    reps: int

    @property
    def ms(self) -> float:
        return self.median * 1e3

    def __truediv__(self, other: Timing) -> float:
        """Ratio of medians: ``ours / baseline``."""
        return self.median / other.median


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], *, warmup: int = 2, reps: int = 10, sync: bool = True) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``reps`` times timed; CUDA work is synchronised around each run."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    sync_fn = _synchronize if sync else (lambda: None)
    for _ in range(warmup):
        fn()
    sync_fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync_fn()
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), max(times), reps)


def _rss_high_water_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("VmHWM not found in /proc/self/status")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure_in_this_process(target: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Run one case here (we are the fresh subprocess) and return its peak memory above the set-up's."""
    module_name, _, func_name = target.partition(":")
    make_case = getattr(importlib.import_module(module_name), func_name)
    run = make_case(**kwargs)
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated() - base, "kind": "cuda max_memory_allocated"}
    base = _rss_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the resident-set high-water mark (Linux >= 4.0), so set-up peaks don't count
        kind = "cpu RSS high-water (reset after set-up)"
    except OSError:
        kind = "cpu RSS high-water (includes set-up)"
    run()
    return {"peak_bytes": _rss_high_water_bytes() - base, "kind": kind}


def peak_memory(target: str, **kwargs: Any) -> int:
    """Peak bytes used by the callable that ``target`` (``"module:function"``) builds from ``kwargs``.

    Runs in a fresh Python process so allocator caches and earlier cases do not blur the number.
    """
    cmd = [sys.executable, "-m", "benchmarks.harness", "--peak-memory", target, json.dumps(kwargs)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-memory subprocess for {target}{kwargs} failed:\n{proc.stderr[-3000:]}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"])


def machine_description() -> str:
    """One line naming the hardware and software a table was measured on."""
    import torch

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{device}; torch {torch.__version__}; python {platform.python_version()}"


def _format(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e5:
            return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)


@dataclass
class Report:
    """A table of benchmark rows, printed as markdown and optionally saved as JSON."""

    title: str
    columns: Sequence[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, **row: Any) -> None:
        missing = [c for c in self.columns if c not in row]
        if missing:
            raise KeyError(f"row lacks columns {missing}")
        self.rows.append(row)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", f"Machine: {machine_description()}", ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        for row in self.rows:
            lines.append("| " + " | ".join(_format(row[c]) for c in self.columns) + " |")
        lines.extend(["", *self.notes] if self.notes else [])
        return "\n".join(lines)

    def emit(self, json_path: str | None = None) -> None:
        """Print the markdown table; write ``{title, machine, columns, rows, notes}`` to ``json_path`` if given."""
        print(self.markdown(), flush=True)
        if json_path:
            payload = {"machine": machine_description(), **asdict(self)}
            os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
            with open(json_path, "w") as f:
                json.dump(payload, f, indent=2, default=str)


def bench_parser(description: str | None = None) -> argparse.ArgumentParser:
    """Arguments every benchmark script takes: ``--reps``, ``--warmup``, ``--json PATH``, ``--quick``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per case (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    parser.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    parser.add_argument("--quick", action="store_true", help="small sizes, for checking the script runs")
    return parser


if __name__ == "__main__":
    # subprocess entry point of peak_memory()
    if len(sys.argv) != 4 or sys.argv[1] != "--peak-memory":
        sys.exit("usage: python -m benchmarks.harness --peak-memory module:function JSON_KWARGS")
    print(json.dumps(_measure_in_this_process(sys.argv[2], json.loads(sys.argv[3]))))
