"""Board frames from bytes: a pure, numpy-vectorised decoder fed in any chunking.

A frame is 22 bytes (spec/serial-protocol.md): E8, counter, 11, 20, checksum, 8 channels
x 2 bytes (bit 7 clear), 8E. The decoder finds every candidate E8 in the buffer at once,
checks markers, constants, the bit-7 rule and the (pluggable) checksum with whole-array
operations, and resolves overlapping candidates exactly as a byte-at-a-time parser would:
on any failure advance ONE byte. Only candidates that overlap an accepted frame (rare: a
stray E8 in a counter or checksum byte that also passes every check) are looked at in a
Python loop. A buffer ending inside a possible frame keeps at most 21 bytes as tail.

Sample positions come from the 6-bit counter (a jump of d means d-1 frames lost, placed at
their own positions). A counter that aliases (64+ frames lost) is corrected with arrival
time as the second witness when the caller passes `arrival` (monotonic seconds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from device_agent.record import ELECTRODES, MEASURED_LEADS

FRAME_LEN = 22
START, LENGTH, OPCODE, END = 0xE8, 0x11, 0x20, 0x8E
N_CHANNELS = len(MEASURED_LEADS)
COUNTER_MOD = 64
# Arrival timing must exceed the counter's count by this many frames before a wrap is
# assumed: covers reader latency (a late read makes frames look older) of up to ~90 ms.
WITNESS_SLACK = 45

_PAYLOAD = np.arange(5, 21)
# Per channel, offsets of the high and low byte in the frame, by byte order.
_OFFSETS = {
    "high-first": (np.arange(5, 21, 2), np.arange(6, 21, 2)),
    "low-first": (np.arange(6, 21, 2), np.arange(5, 21, 2)),
}
# Electrode flags: (channel, bit) in ELECTRODES order: LA=I b5, RA=II b5, LL=II b6, Vn b5.
_FLAG_CHANNEL = np.array([0, 1, 1, 2, 3, 4, 5, 6, 7])
_FLAG_BIT = np.array([5, 5, 6, 5, 5, 5, 5, 5, 5], dtype=np.uint8)
assert len(_FLAG_CHANNEL) == len(ELECTRODES)

ChecksumVerifier = Callable[[np.ndarray], np.ndarray]
"""Takes frames as uint8 (n, 22), returns a bool mask of those whose checksum is good."""


@dataclass(frozen=True)
class Frames:
    """A batch of decoded frames, in arrival order."""

    position: np.ndarray  # int64 sample index since the decoder started
    counter: np.ndarray  # uint8, 0..63
    checksum: np.ndarray  # uint8, kept as sent
    counts: np.ndarray  # uint16 (n, 8), 12-bit counts in MEASURED_LEADS order
    electrodes: np.ndarray  # bool (n, 9), True = connected, ELECTRODES order
    arrival: float | None = None  # monotonic time the bytes were read, if known

    def __len__(self) -> int:
        return int(self.position.shape[0])

    @staticmethod
    def empty() -> Frames:
        """A batch with no frames."""
        return Frames(
            np.zeros(0, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.uint8),
            np.zeros((0, N_CHANNELS), np.uint16), np.zeros((0, len(ELECTRODES)), bool),
        )

    @staticmethod
    def concat(batches: list[Frames]) -> Frames:
        """One batch from many (arrival dropped)."""
        if not batches:
            return Frames.empty()
        return Frames(
            np.concatenate([b.position for b in batches]),
            np.concatenate([b.counter for b in batches]),
            np.concatenate([b.checksum for b in batches]),
            np.concatenate([b.counts for b in batches]),
            np.concatenate([b.electrodes for b in batches]),
        )


def find_frames(buf: np.ndarray, verify: ChecksumVerifier | None = None) -> np.ndarray:
    """Start offsets of the frames a one-byte-resync parser accepts in `buf` (full frames only)."""
    if buf.size < FRAME_LEN:
        return np.zeros(0, np.int64)
    cand = np.flatnonzero(buf[: buf.size - FRAME_LEN + 1] == START)
    if cand.size == 0:
        return cand.astype(np.int64)
    ok = (buf[cand + 21] == END) & (buf[cand + 2] == LENGTH) & (buf[cand + 3] == OPCODE)
    cand = cand[ok]
    payload = buf[cand[:, None] + _PAYLOAD]
    cand = cand[~(payload & 0x80).any(axis=1)]
    if verify is not None and cand.size:
        cand = cand[np.asarray(verify(buf[cand[:, None] + np.arange(FRAME_LEN)]), bool)]
    if cand.size < 2:
        return cand.astype(np.int64)
    conflicts = np.flatnonzero(np.diff(cand) < FRAME_LEN) + 1
    if conflicts.size == 0:
        return cand.astype(np.int64)
    # A candidate starting inside an accepted frame is never looked at by the parser.
    accepted = np.ones(cand.size, bool)
    for k in conflicts:
        j = k - 1
        while not accepted[j]:
            j -= 1
        accepted[k] = cand[k] >= cand[j] + FRAME_LEN
    return cand[accepted].astype(np.int64)


def decode_frames(buf: np.ndarray, starts: np.ndarray, byte_order: str = "high-first"):
    """(counter, checksum, counts (n, 8), electrodes (n, 9)) of frames at `starts` in `buf`."""
    hi_off, lo_off = _OFFSETS[byte_order]
    hi = buf[starts[:, None] + hi_off]
    lo = buf[starts[:, None] + lo_off]
    counts = ((hi.astype(np.uint16) & 0x1F) << 7) | (lo & 0x7F)
    flags = ((hi[:, _FLAG_CHANNEL] >> _FLAG_BIT) & 1).astype(bool)
    return buf[starts + 1] & 0x3F, buf[starts + 4], counts, flags


class FrameDecoder:
    """Feed bytes in any chunking; get decoded frames with their sample positions."""

    def __init__(
        self,
        *,
        byte_order: str = "high-first",
        sampling_rate: float = 500.0,
        verify: ChecksumVerifier | None = None,
    ) -> None:
        if byte_order not in _OFFSETS:
            raise ValueError(f"byte order {byte_order!r}: expected high-first or low-first")
        self.byte_order = byte_order
        self.sampling_rate = float(sampling_rate)  # frames per second of arrival time
        self.verify = verify
        self._tail = np.zeros(0, np.uint8)
        self._last_counter: int | None = None
        self._last_position = -1
        self._last_arrival: float | None = None
        self.frames_decoded = 0
        self.frames_lost = 0
        self.garbage_bytes = 0
        self.bytes_fed = 0
        self.wraps_from_timing = 0
        self.resyncs = 0  # runs of bytes that formed no frame (bad frames, junk)
        self._in_junk = False

    def feed(self, data: bytes | bytearray | memoryview, arrival: float | None = None) -> Frames:
        """Decode every complete frame in tail + data; keep an incomplete end for next time."""
        self.bytes_fed += len(data)
        chunk = np.frombuffer(data, np.uint8)
        buf = np.concatenate((self._tail, chunk)) if self._tail.size else chunk
        starts = find_frames(buf, self.verify)
        # Everything before the first byte that could still begin a frame is settled.
        settled = max(buf.size - (FRAME_LEN - 1), 0)
        if starts.size:
            settled = max(settled, int(starts[-1]) + FRAME_LEN)
        self.garbage_bytes += settled - FRAME_LEN * int(starts.size)
        self._count_resyncs(starts, settled)
        self._tail = buf[settled:].copy()
        if starts.size == 0:
            return replace(Frames.empty(), arrival=arrival)
        counter, checksum, counts, flags = decode_frames(buf, starts, self.byte_order)
        position = self._place(counter.astype(np.int64), arrival)
        self.frames_decoded += int(starts.size)
        return Frames(position, counter, checksum, counts, flags, arrival)

    def _count_resyncs(self, starts: np.ndarray, settled: int) -> None:
        ends = starts + FRAME_LEN
        gaps = starts - np.concatenate(([0], ends[:-1]))
        final = settled - (int(ends[-1]) if starts.size else 0)
        sizes = np.append(gaps, final)
        runs = int(np.count_nonzero(sizes))
        if self._in_junk and sizes[0] > 0:
            runs -= 1  # the same run continues from the previous feed
        self.resyncs += runs
        if starts.size or settled:
            self._in_junk = final > 0

    def _place(self, counter: np.ndarray, arrival: float | None) -> np.ndarray:
        prev = self._last_counter
        step = np.empty(counter.size, np.int64)
        step[1:] = (counter[1:] - counter[:-1]) % COUNTER_MOD
        step[0] = 0 if prev is None else (counter[0] - prev) % COUNTER_MOD
        step[step == 0] = COUNTER_MOD  # a repeated counter can only mean 64 lost frames
        if prev is None:
            step[0] = 1  # the first frame ever is position 0
        elif arrival is not None and self._last_arrival is not None:
            # Second witness: frames the clock says passed vs frames the counter says.
            by_clock = (arrival - self._last_arrival) * self.sampling_rate
            extra = by_clock - int(step.sum())
            if extra > WITNESS_SLACK:
                wraps = int((extra + COUNTER_MOD - WITNESS_SLACK) // COUNTER_MOD)
                step[0] += wraps * COUNTER_MOD  # the silence was before this chunk
                self.wraps_from_timing += wraps
        position = self._last_position + np.cumsum(step)
        lost = int(step.sum()) - counter.size
        self.frames_lost += lost
        self._last_counter = int(counter[-1])
        self._last_position = int(position[-1])
        if arrival is not None:
            self._last_arrival = arrival
        return position
