"""The benchmark harness measures what it claims (timing statistics, subprocess peak memory, tables)."""

from __future__ import annotations

import json
import time

import pytest

from benchmarks.harness import Report, Timing, peak_memory, time_fn


def allocate_case(mib: int):
    """A peak-memory case: set-up allocates nothing, the run touches ``mib`` MiB."""

    def run():
        import numpy as np

        buf = np.ones(mib * 2**20, dtype=np.uint8)  # np.ones writes every page, so it is resident
        return int(buf[-1])

    return run


def test_time_fn_statistics():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    timing = time_fn(fn, warmup=3, reps=5, sync=False)
    assert len(calls) == 8
    assert timing.reps == 5 and timing.min <= timing.median <= timing.max
    assert timing.median >= 0.002
    assert Timing(2.0, 2.0, 2.0, 1) / Timing(1.0, 1.0, 1.0, 1) == 2.0
    with pytest.raises(ValueError, match="reps must be >= 1"):
        time_fn(fn, reps=0)


def test_peak_memory_subprocess_sees_the_run_allocation():
    small = peak_memory("tests.test_benchmark_harness:allocate_case", mib=8)
    large = peak_memory("tests.test_benchmark_harness:allocate_case", mib=200)
    assert 150 * 2**20 < large - small < 260 * 2**20


def test_report_markdown_and_json(tmp_path):
    report = Report("demo", columns=["case", "ratio"])
    report.add(case="n=8", ratio=1.23456)
    with pytest.raises(KeyError, match="lacks columns"):
        report.add(case="x")
    md = report.markdown()
    assert "| case | ratio |" in md and "| n=8 | 1.235 |" in md
    path = tmp_path / "out" / "r.json"
    report.emit(str(path))
    data = json.loads(path.read_text())
    assert data["rows"] == [{"case": "n=8", "ratio": 1.23456}] and "machine" in data
