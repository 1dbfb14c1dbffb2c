"""Helpers the bench_*.py scripts share: timers, the machine's name and the Markdown table.

Timing rules (every bench follows them): contestants run interleaved round-robin in one
process, CPU time (`time.process_time`), medians over at least 15 rounds, the machine named.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

COLUMNS = ("benchmark", "metric", "value", "baseline", "ratio", "note")
MIN_ROUNDS = 15


def median_s(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time (s) of `repeats` calls of `fn`, after one warm-up call."""
    fn()  # warm up imports and caches (e.g. a lookup table built once per process)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_cpu(
    contestants: Mapping[str, Callable[[], object]],
    *,
    rounds: int = 31,
    calls: int = 5,
    seed: int = 0,
) -> dict[str, list[float]]:
    """CPU seconds per call of each contestant, one mean per round, called round-robin.

    A round is `calls` passes; each pass calls every contestant once (round-robin), in a
    freshly shuffled order (seeded, so runs repeat), each call timed on its own (process_time has ns
    resolution on Linux, and its ~0.6 us overhead is noise next to calls of 0.1 ms and
    more). So each call finds the caches and the allocator as a random other contestant
    left them, as a call made once per record in a real process does, and no contestant
    always runs first or after the same one. A round's value is the mean of its calls;
    take medians over rounds.
    """
    if rounds < MIN_ROUNDS:
        raise ValueError(f"rounds={rounds}: medians need at least {MIN_ROUNDS} rounds")
    names = list(contestants)
    for fn in contestants.values():
        fn()  # warm up imports and caches (e.g. a lookup table built once per process)
    clock = time.process_time
    times: dict[str, list[float]] = {name: [] for name in names}
    order = list(names)
    shuffle = random.Random(seed).shuffle
    for _ in range(rounds):
        spent = dict.fromkeys(names, 0.0)
        for _ in range(calls):
            shuffle(order)
            for name in order:
                fn = contestants[name]
                t0 = clock()
                fn()
                spent[name] += clock() - t0
        for name in names:
            times[name].append(spent[name] / calls)
    return times


def ratio_spread(baseline: list[float], ours: list[float]) -> tuple[float, float, float]:
    """Quartiles (p25, median, p75) of the per-round ratio baseline / ours."""
    ratios = sorted(b / o for b, o in zip(baseline, ours, strict=True))
    q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, q2, q3


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
    """The CPU model, core count, Python and OS this run was made on."""
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
