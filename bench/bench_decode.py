"""Decode speed: the numpy FrameDecoder vs a per-frame pure-Python decoder, same frames.

The stream is SECONDS of board frames with drop/garbage/lose faults (the decoder's slow
path runs whenever a chunk holds junk); one row also decodes a clean stream. The numpy
decoder is fed in chunks of the sizes a reader might read, including the size the reader
now reads at the board's rate (port.READ_CHUNK, 2 KiB every ~0.19 s) and the 550 B it read
before; the batches are then joined and unpacked once, as a capture does. Process CPU time
(time.process_time), contestants round-robin, medians of ROUNDS; each row reports seconds
of 500 Hz signal decoded per CPU second and the ratio to the Python decoder in the same run.
These are warm-loop throughputs: a reader that sleeps between reads pays more per read for
cold caches, which bench_reader.py measures.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import interleaved, machine, medians, print_rows

from device_agent.lab.simulator import FaultSpec, Truth, encode_frames, inject
from device_agent.link.framing import FrameDecoder, Frames
from device_agent.link.port import READ_CHUNK

SECONDS = 20
RATE = 500
ROUNDS = 15


def _stream(faults: FaultSpec) -> bytes:
    rng = np.random.default_rng(0)
    n = SECONDS * RATE
    counts = rng.integers(1500, 2600, size=(n, 8)).astype(np.uint16)
    frames = encode_frames(counts, np.arange(n))
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


def numpy_decode(data: bytes, chunk: int) -> Frames:
    """Feed `data` in reads of `chunk` bytes, then join and unpack once (as a capture does)."""
    dec = FrameDecoder()
    batches = [dec.feed(data[k : k + chunk]) for k in range(0, len(data), chunk)]
    frames = Frames.concat([*batches, dec.flush()])
    frames.counts  # noqa: B018 (the unpacking is part of decoding)
    return frames


def run() -> list[dict]:
    """Benchmark rows: decode speed vs real time and vs the pure-Python decoder."""
    faulty = _stream(FaultSpec(drop=0.0005, garbage=0.0005, lose=0.001))
    clean = _stream(FaultSpec())
    cases = {
        "whole buffer": (faulty, len(faulty)),
        "4 KiB reads": (faulty, 4096),
        f"{READ_CHUNK} B reads (the reader's, at the board's rate)": (faulty, READ_CHUNK),
        f"{READ_CHUNK} B reads, clean link": (clean, READ_CHUNK),
        "550 B reads (the reader's before)": (faulty, 550),
        "220 B reads": (faulty, 220),
    }
    expect = len(python_decode(faulty))
    for label, (data, chunk) in cases.items():
        got = len(numpy_decode(data, chunk))
        if data is faulty and got != expect:
            raise AssertionError(f"decoders disagree at {label}: {got} vs {expect} frames")
    contestants = {"python": partial(python_decode, faulty)}
    for label, (data, chunk) in cases.items():
        contestants[label] = partial(numpy_decode, data, chunk)
    times = medians(interleaved(contestants, rounds=ROUNDS))
    py = times["python"]
    rows = []
    for label in cases:
        rows.append({"benchmark": "decode", "metric": f"x real time, {label}",
                     "value": round(SECONDS / times[label]), "baseline": round(SECONDS / py),
                     "ratio": round(py / times[label], 1),
                     "note": f"median of {ROUNDS}, round-robin, process CPU; baseline = "
                             f"per-frame pure-Python decoder on the faulty stream; "
                             f"{len(faulty)} bytes with drop/garbage/lose faults; {machine()}"})
    return rows


if __name__ == "__main__":
    print_rows(run())
