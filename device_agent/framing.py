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
time as the second witness when the caller passes `arrival` (monotonic seconds). A frame
whose counter fits neither neighbour (a corrupted counter byte) is dropped, not allowed to
push every later frame 64 places on (see `impostors`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from device_agent.record import ELECTRODES, MEASURED_LEADS

# --- The frame layout (spec/serial-protocol.md): the one table the decoder and the lab's
# encoder both read. Byte offsets within a frame:
FRAME_LEN = 22
AT_START, AT_COUNTER, AT_LENGTH, AT_OPCODE, AT_CHECKSUM, AT_END = 0, 1, 2, 3, 4, 21
START, LENGTH, OPCODE, END = 0xE8, 0x11, 0x20, 0x8E
PAYLOAD_AT = 5  # channel c (MEASURED_LEADS order) is bytes PAYLOAD_AT + 2c and + 2c + 1
N_CHANNELS = len(MEASURED_LEADS)
COUNTER_MOD = 64
COUNTER_MASK = COUNTER_MOD - 1  # the top two bits of the counter byte carry nothing
LOW_BITS = 7  # sample = (high & HIGH_MASK) << LOW_BITS | (low & LOW_MASK)
HIGH_MASK, LOW_MASK = 0x1F, 0x7F
BYTE_ORDERS = ("high-first", "low-first")
# Electrode flags, ELECTRODES order: the channel whose HIGH byte carries it, and the bit.
ELECTRODE_FLAGS = {
    "LA": ("I", 5), "RA": ("II", 5), "LL": ("II", 6), "V1": ("V1", 5), "V2": ("V2", 5),
    "V3": ("V3", 5), "V4": ("V4", 5), "V5": ("V5", 5), "V6": ("V6", 5),
}
assert tuple(ELECTRODE_FLAGS) == ELECTRODES
FLAG_CHANNEL = np.array([MEASURED_LEADS.index(ch) for ch, _ in ELECTRODE_FLAGS.values()])
FLAG_BIT = np.array([bit for _, bit in ELECTRODE_FLAGS.values()], dtype=np.uint8)

# Arrival timing must exceed the counter's count by this many frames before a wrap is
# assumed: covers reader latency (a late read makes frames look older) of up to ~90 ms.
WITNESS_SLACK = 45

_PAYLOAD = np.arange(PAYLOAD_AT, PAYLOAD_AT + 2 * N_CHANNELS)


def channel_offsets(byte_order: str) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets in a frame of each channel's (high, low) byte, for a byte order."""
    first = PAYLOAD_AT + 2 * np.arange(N_CHANNELS)
    if byte_order == "high-first":
        return first, first + 1
    if byte_order == "low-first":
        return first + 1, first
    raise ValueError(f"byte order {byte_order!r}: expected one of {', '.join(BYTE_ORDERS)}")


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
    ok = ((buf[cand + AT_END] == END) & (buf[cand + AT_LENGTH] == LENGTH)
          & (buf[cand + AT_OPCODE] == OPCODE))
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


_Decoded = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def decode_frames(buf: np.ndarray, starts: np.ndarray, byte_order: str = "high-first") -> _Decoded:
    """(counter, checksum, counts (n, 8), electrodes (n, 9)) of frames at `starts` in `buf`."""
    hi_off, lo_off = channel_offsets(byte_order)
    hi = buf[starts[:, None] + hi_off]
    lo = buf[starts[:, None] + lo_off]
    counts = ((hi.astype(np.uint16) & HIGH_MASK) << LOW_BITS) | (lo & LOW_MASK)
    flags = ((hi[:, FLAG_CHANNEL] >> FLAG_BIT) & 1).astype(bool)
    return buf[starts + AT_COUNTER] & COUNTER_MASK, buf[starts + AT_CHECKSUM], counts, flags


def counter_steps(counter: np.ndarray, prev: int | None) -> np.ndarray:
    """Frames advanced from each counter's predecessor (`prev` before the first): 1..64."""
    c = counter.astype(np.int64)
    step = np.empty(c.size, np.int64)
    step[1:] = (c[1:] - c[:-1]) % COUNTER_MOD
    if c.size:
        step[0] = 1 if prev is None else (c[0] - prev) % COUNTER_MOD
    step[step == 0] = COUNTER_MOD  # a repeated counter can only mean 64 lost frames
    return step


def _step(a: int, b: int) -> int:
    return (b - a) % COUNTER_MOD or COUNTER_MOD


def impostors(counter: np.ndarray, prev: int | None, *, trusted: int | None = None) -> tuple[
        np.ndarray, bool]:
    """(keep mask, last one undecided) for frames whose counter fits neither neighbour.

    A frame whose counter byte was corrupted (a bit error; or, on a link that drops bytes,
    a lost counter byte after a stray E8) passes every structural check, and its counter
    would put every later frame 64 places too far. Seen from its neighbours it stands out:
    going from the previous frame to the next one through it counts 64 more frames than
    going directly (steps s1 + s2 > 64 while neither is 1). Such a frame is dropped. Only
    frames whose step is not 1 are examined (a Python loop over few). A last frame that
    needs examining cannot be judged yet (its successor is in the next chunk): the caller
    holds it back. `trusted` is the index of a frame that follows a silence seen by the
    clock: it and its predecessor are accepted unjudged, the counters across a silence
    say nothing about each other.
    """
    c = counter.astype(np.int64)
    n = c.size
    keep = np.ones(n, bool)
    for k in np.flatnonzero(counter_steps(c, prev) != 1).tolist():
        if k == trusted or (k == 0 and prev is None):
            continue
        j = k - 1
        while j >= 0 and not keep[j]:
            j -= 1
        p = int(c[j]) if j >= 0 else prev
        assert p is not None  # frame 0 of the first chunk ever is never examined
        s1 = _step(p, int(c[k]))
        if s1 == 1:
            continue  # its predecessor was the impostor
        if k == n - 1:
            return keep, True
        if trusted is not None and k == trusted - 1:
            continue
        s2 = _step(int(c[k]), int(c[k + 1]))
        # c[k+1] == p (direct step 64) is a stuck counter, not one bad frame: leave it be
        if s2 > 1 and s1 + s2 > COUNTER_MOD and int(c[k + 1]) != p:
            keep[k] = False
    return keep, False


class FrameDecoder:
    """Feed bytes in any chunking; get decoded frames with their sample positions.

    The result does not depend on how the bytes are chunked. A frame whose counter step is
    not 1 and that ends a chunk is held back until the next frame arrives (see `impostors`);
    `flush()` hands it over when no more bytes will come.
    """

    def __init__(
        self,
        *,
        byte_order: str = "high-first",
        sampling_rate: float = 500.0,
        verify: ChecksumVerifier | None = None,
    ) -> None:
        channel_offsets(byte_order)  # raises ValueError naming the valid orders
        self.byte_order = byte_order
        self.sampling_rate = float(sampling_rate)  # frames per second of arrival time
        self.verify = verify
        self._tail = np.zeros(0, np.uint8)
        self._held: _Decoded | None = None
        self._last_counter: int | None = None
        self._last_position = -1
        self._last_arrival: float | None = None
        self.frames_decoded = 0
        self.frames_lost = 0
        self.frames_rejected = 0  # counter fits neither neighbour (see `impostors`)
        self.garbage_bytes = 0
        self.bytes_fed = 0
        self.wraps_from_timing = 0
        self.resyncs = 0  # runs of bytes that formed no frame (bad frames, junk), rejected frames
        self._in_junk = False

    @property
    def frames_held(self) -> int:
        """Frames decoded but held back until their successor arrives (0 or 1)."""
        return 0 if self._held is None else 1

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
        return self._accept(decode_frames(buf, starts, self.byte_order), arrival)

    def flush(self) -> Frames:
        """The held-back frame, if any, accepted on its predecessor alone (end of stream)."""
        held, self._held = self._held, None
        if held is None:
            return Frames.empty()
        counter, checksum, counts, flags = held
        position = self._place(counter, 0, 0)
        return Frames(position, counter, checksum, counts, flags, self._last_arrival)

    def _accept(self, decoded: _Decoded, arrival: float | None) -> Frames:
        fresh = decoded[0].size
        if self._held is not None:
            h = self._held
            decoded = (np.concatenate((h[0], decoded[0])), np.concatenate((h[1], decoded[1])),
                       np.concatenate((h[2], decoded[2])), np.concatenate((h[3], decoded[3])))
        first_new = decoded[0].size - fresh  # 1 when a held frame leads the batch
        counter = decoded[0]
        prev = self._last_counter
        wraps = 0
        if prev is not None and arrival is not None and self._last_arrival is not None:
            # Second witness: frames the clock says passed since the last chunk vs frames
            # the counter says; the silence, if any, was just before this chunk.
            by_clock = (arrival - self._last_arrival) * self.sampling_rate
            extra = by_clock - int(counter_steps(counter, prev)[first_new:].sum())
            if extra > WITNESS_SLACK:
                wraps = int((extra + COUNTER_MOD - WITNESS_SLACK) // COUNTER_MOD)
        keep, hold = impostors(counter, prev, trusted=first_new if wraps else None)
        rejected = int(np.count_nonzero(~keep))
        self.frames_rejected += rejected
        self.resyncs += rejected
        self.garbage_bytes += FRAME_LEN * rejected
        if arrival is not None:
            self._last_arrival = arrival
        self._held = None
        if hold:
            self._held = (decoded[0][-1:].copy(), decoded[1][-1:].copy(),
                          decoded[2][-1:].copy(), decoded[3][-1:].copy())
            keep[-1] = False
        out = [a[keep] for a in decoded]
        if not out[0].size:
            return replace(Frames.empty(), arrival=arrival)
        at = int(np.count_nonzero(keep[:first_new]))  # first kept frame of the new bytes
        position = self._place(out[0], wraps, at)
        return Frames(position, out[0], out[1], out[2], out[3], arrival)

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

    def _place(self, counter: np.ndarray, wraps: int, at: int) -> np.ndarray:
        """Positions of accepted frames; `wraps` x 64 frames lost just before frame `at`."""
        step = counter_steps(counter, self._last_counter)
        if wraps:
            step[at] += wraps * COUNTER_MOD
            self.wraps_from_timing += wraps
        position = self._last_position + np.cumsum(step)
        self.frames_lost += int(step.sum()) - counter.size
        self.frames_decoded += counter.size
        self._last_counter = int(counter[-1])
        self._last_position = int(position[-1])
        return position
