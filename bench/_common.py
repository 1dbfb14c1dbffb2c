"""Helpers the bench_*.py scripts share: timers, round-robin runs, the machine, the table."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

COLUMNS = ("benchmark", "metric", "value", "baseline", "ratio", "note")


def median_s(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time (s) of `repeats` calls of `fn`, after one warm-up call."""
    fn()  # warm up imports and caches (e.g. a lookup table built once per process)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(contestants: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median of each contestant's measurement, run round-robin `rounds` times after a warm-up.

    Round-robin, so a machine that slows down (another job, thermal) slows every contestant
    alike instead of whichever happened to run then.
    """
    for fn in contestants.values():
        fn()
    results: dict[str, list[float]] = {name: [] for name in contestants}
    for _ in range(rounds):
        for name, fn in contestants.items():
            results[name].append(fn())
    return {name: statistics.median(values) for name, values in results.items()}


def cpu_s(fn: Callable[[], object]) -> Callable[[], float]:
    """A contestant for `interleaved`: the process CPU time (s, all threads) of one call."""

    def run() -> float:
        t0 = time.process_time()
        fn()
        return time.process_time() - t0

    return run


def machine() -> str:
    """The CPU model, cores, Python and kernel a benchmark ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def print_rows(rows: list[dict]) -> None:
    """Print benchmark rows as one Markdown table."""
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in COLUMNS) + " |")
