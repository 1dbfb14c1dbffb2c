"""Helpers the bench_*.py scripts share: timers, the machine's name and the Markdown table.

Timing rules (every bench follows them): contestants run interleaved round-robin
(`interleaved`, the one helper for it), CPU time (`time.process_time`, or getrusage of a
child), medians over at least 15 rounds, each row a ratio to a baseline measured in the same
run, the machine named.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

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


def cpu_time(fn: Callable[[], object]) -> float:
    """The process CPU seconds (all threads) of one call of `fn`: the default measure."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def reported(fn: Callable[[], object]) -> float:
    """The measure of a contestant that times itself (e.g. a subprocess's own CPU): its value."""
    value = fn()
    if not isinstance(value, int | float):
        raise TypeError(f"a reported measurement must be a number, not {value!r}")
    return float(value)


def interleaved(
    contestants: Mapping[str, Callable[[], object]],
    *,
    rounds: int = 31,
    calls: int = 1,
    seed: int = 0,
    measure: Callable[[Callable[[], object]], float] = cpu_time,
) -> dict[str, list[float]]:
    """Each contestant's measurement per round (the mean of its `calls`), run round-robin.

    The one round-robin every bench uses. After one warm-up call each (imports, lookup tables
    built once per process), a round is `calls` passes; each pass calls every contestant
    once, in a freshly shuffled order (seeded, so runs repeat), each call measured on its own
    by `measure` (default: CPU time of the call; `reported` for a contestant that returns
    its own measurement). So a slow spell of the machine (another job, a frequency change)
    falls on every contestant alike, each call finds the caches as a random other contestant
    left them, and none always runs first. Take medians over rounds (`medians`).
    """
    if rounds < MIN_ROUNDS:
        raise ValueError(f"rounds={rounds}: medians need at least {MIN_ROUNDS} rounds")
    names = list(contestants)
    for fn in contestants.values():
        fn()
    values: dict[str, list[float]] = {name: [] for name in names}
    order = list(names)
    shuffle = random.Random(seed).shuffle
    for _ in range(rounds):
        spent = dict.fromkeys(names, 0.0)
        for _ in range(calls):
            shuffle(order)
            for name in order:
                spent[name] += measure(contestants[name])
        for name in names:
            values[name].append(spent[name] / calls)
    return values


def medians(values: Mapping[str, list[float]]) -> dict[str, float]:
    """The median of each contestant's per-round values."""
    return {name: statistics.median(v) for name, v in values.items()}


def ratio_spread(baseline: list[float], ours: list[float]) -> tuple[float, float, float]:
    """Quartiles (p25, median, p75) of the per-round ratio baseline / ours."""
    ratios = sorted(b / o for b, o in zip(baseline, ours, strict=True))
    q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, q2, q3


def verdict(ratio: float, *, at_most: float | None = None, at_least: float | None = None,
            ) -> str:
    """'aim <= 1.2x: met' (or 'NOT met'): a row's pass/fail against the issue's figure."""
    if at_most is not None:
        return f"aim <= {at_most:g}x: {'met' if ratio <= at_most else 'NOT met'}"
    if at_least is not None:
        return f"aim >= {at_least:g}x: {'met' if ratio >= at_least else 'NOT met'}"
    raise ValueError("verdict needs at_most or at_least")


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


def print_rows(rows: list[dict[str, Any]]) -> None:
    """Print benchmark rows as one Markdown table."""
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in COLUMNS) + " |")


def unit_environment(unit: Path | None = None) -> dict[str, str]:
    """The Environment= settings of the systemd unit: a service is measured as deployed."""
    unit = unit or Path(__file__).resolve().parents[1] / "systemd" / "device-agent.service"
    env = {}
    for line in unit.read_text().splitlines():
        if line.startswith("Environment="):
            key, _, value = line.removeprefix("Environment=").partition("=")
            env[key] = value
    return env
