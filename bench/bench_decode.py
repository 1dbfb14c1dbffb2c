"""Decode speed: the numpy FrameDecoder vs a per-sample pure-Python decoder, same frames.

Reports medians over several runs, as a multiple of real time (seconds of 500 Hz signal
decoded per second of CPU) and as a ratio to the pure-Python baseline measured in this run.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_rows

from device_agent.framing import FrameDecoder
from device_agent.lab.simulator import FaultSpec, Truth, encode_frames, inject
from device_agent.port import READ_CHUNK

SECONDS = 60
RATE = 500
RUNS = 5


def _stream() -> bytes:
    rng = np.random.default_rng(0)
    n = SECONDS * RATE
    counts = rng.integers(1500, 2600, size=(n, 8)).astype(np.uint16)
    frames = encode_frames(counts, np.arange(n))
    faults = FaultSpec(drop=0.0005, garbage=0.0005, lose=0.001)
    return inject(frames, np.arange(n), faults, rng, Truth())


def python_decode(data: bytes) -> list[tuple[int, list[int]]]:
    """The legacy way, done right: a byte-at-a-time parser in pure Python."""
    out, i, last, pos = [], 0, None, -1
    n = len(data)
    while i + 22 <= n:
        if (data[i] == 0xE8 and data[i + 21] == 0x8E and data[i + 2] == 0x11
                and data[i + 3] == 0x20 and all(b < 0x80 for b in data[i + 5 : i + 21])):
            counter = data[i + 1] & 0x3F
            pos += 1 if last is None else ((counter - last) % 64 or 64)
            last = counter
            out.append((pos, [((data[i + 5 + 2 * c] & 0x1F) << 7) | (data[i + 6 + 2 * c] & 0x7F)
                              for c in range(8)]))
            i += 22
        else:
            i += 1
    return out


def _numpy_decode(data: bytes, chunk: int) -> int:
    dec = FrameDecoder()
    total = 0
    for k in range(0, len(data), chunk):
        total += len(dec.feed(data[k : k + chunk]))
    return total


def _median_time(fn, *args) -> tuple[float, object]:
    times, result = [], None
    for _ in range(RUNS):
        t0 = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def run() -> list[dict]:
    """Benchmark rows: decode speed vs real time and vs the pure-Python decoder."""
    data = _stream()
    py_t, py_out = _median_time(python_decode, data)
    rows = []
    for chunk, label in ((len(data), "whole 60 s buffer"), (4096, "4 KiB reads"),
                         (READ_CHUNK, f"{READ_CHUNK} B reads (50 ms of link, as the reader reads)"),
                         (220, "220 B reads (20 ms of link)")):
        np_t, n = _median_time(_numpy_decode, data, chunk)
        if n != len(py_out):
            raise AssertionError(f"decoders disagree: {n} vs {len(py_out)} frames")
        rows.append({"benchmark": "decode", "metric": f"x real time, {label}",
                     "value": round(SECONDS / np_t), "baseline": round(SECONDS / py_t),
                     "ratio": round(py_t / np_t, 1),
                     "note": f"median of {RUNS}; baseline = per-sample pure-Python decoder; "
                             f"{len(data)} bytes with drop/garbage/lose faults"})
    return rows


if __name__ == "__main__":
    print_rows(run())
