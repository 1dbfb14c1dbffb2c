"""Helpers the bench_*.py scripts share: a median timer and the Markdown table they print."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

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


def print_rows(rows: list[dict]) -> None:
    """Print benchmark rows as one Markdown table."""
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in COLUMNS) + " |")


def interleaved_cpu_medians(
    contestants: dict[str, Callable[[], object]], repeats: int = 15
) -> dict[str, float]:
    """Median CPU seconds per call of each contestant, called round-robin `repeats` times.

    Round-robin makes a slow spell of the machine (another process, a frequency change)
    fall on every contestant alike; CPU time (time.process_time) leaves out waiting.
    """
    for fn in contestants.values():
        fn()  # warm up imports and caches
    times: dict[str, list[float]] = {name: [] for name in contestants}
    for _ in range(max(repeats, 15)):
        for name, fn in contestants.items():
            t0 = time.process_time()
            fn()
            times[name].append(time.process_time() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}
