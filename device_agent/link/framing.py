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
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from device_agent.core.record import ELECTRODES, MEASURED_LEADS

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

_ARANGE = np.arange(FRAME_LEN)
_MAX_RUN = 1 << 16  # frames in one chunk that the clean-counter check compares at once
_COUNTING = (np.arange(_MAX_RUN + COUNTER_MOD) % COUNTER_MOD).astype(np.uint8)
# One masked comparison checks a candidate's structure: markers and constants where they are
# fixed, bit 7 clear in every payload byte, anything in the counter and checksum bytes.
_CHECK_MASK = np.zeros(FRAME_LEN, np.uint8)
_CHECK_WANT = np.zeros(FRAME_LEN, np.uint8)
for _at, _value in ((AT_START, START), (AT_LENGTH, LENGTH), (AT_OPCODE, OPCODE), (AT_END, END)):
    _CHECK_MASK[_at], _CHECK_WANT[_at] = 0xFF, _value
_CHECK_MASK[PAYLOAD_AT : PAYLOAD_AT + 2 * N_CHANNELS] = 0x80


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
    """A batch of frames, in arrival order: placed as they arrive, unpacked when asked.

    The reader thread only frames and places (counter and arrival clock must be followed
    as bytes come); samples and electrode flags are unpacked from the bytes on first use,
    so an always-on reader pays nothing for them between captures, and a capture unpacks
    its whole record in one call after Frames.concat.
    """

    position: np.ndarray  # int64 sample index since the decoder started
    counter: np.ndarray  # uint8, 0..63
    rows: np.ndarray  # uint8 (n, 22): the frames' bytes as received
    byte_order: str = "high-first"
    arrival: float | None = None  # monotonic time the bytes were read, if known

    def __len__(self) -> int:
        return int(self.position.shape[0])

    @cached_property
    def _unpacked(self) -> tuple[np.ndarray, np.ndarray]:
        _, _, counts, electrodes = decode_rows(self.rows, self.byte_order)
        return counts, electrodes

    @property
    def counts(self) -> np.ndarray:
        """uint16 (n, 8): 12-bit counts in MEASURED_LEADS order."""
        return self._unpacked[0]

    @property
    def electrodes(self) -> np.ndarray:
        """bool (n, 9): True = connected, ELECTRODES order."""
        return self._unpacked[1]

    @property
    def checksum(self) -> np.ndarray:
        """uint8 (n,): the checksum byte as sent."""
        return self.rows[:, AT_CHECKSUM]

    @staticmethod
    def empty(byte_order: str = "high-first", arrival: float | None = None) -> Frames:
        """A batch with no frames."""
        return Frames(np.zeros(0, np.int64), np.zeros(0, np.uint8),
                      np.zeros((0, FRAME_LEN), np.uint8), byte_order, arrival)

    @staticmethod
    def concat(batches: list[Frames]) -> Frames:
        """One batch from many (arrival dropped)."""
        if not batches:
            return Frames.empty()
        return Frames(
            np.concatenate([b.position for b in batches]),
            np.concatenate([b.counter for b in batches]),
            np.concatenate([b.rows for b in batches]),
            batches[0].byte_order,
        )


def _aligned(buf: np.ndarray, verify: ChecksumVerifier | None) -> np.ndarray | None:
    """Bytes (m, 22) of `buf` if it is whole valid frames back to back from its first byte.

    The usual chunk of a clean link: the parser accepts each frame in turn, so a check of
    that view (no search, no gather) is the whole answer. None: use _scan.
    """
    m = buf.size // FRAME_LEN
    if m == 0:
        return None
    rows = buf[: m * FRAME_LEN].reshape(m, FRAME_LEN)
    if not ((rows & _CHECK_MASK) == _CHECK_WANT).all():
        return None
    if verify is not None and not np.asarray(verify(rows), bool).all():
        return None
    return rows


def _scan(buf: np.ndarray, verify: ChecksumVerifier | None) -> tuple[np.ndarray, np.ndarray]:
    """Starts and bytes (n, 22) of the frames a one-byte-resync parser accepts in `buf`."""
    if buf.size < FRAME_LEN:
        return np.zeros(0, np.int64), np.zeros((0, FRAME_LEN), np.uint8)
    rows = _aligned(buf, verify)
    if rows is not None:
        return np.arange(0, rows.size, FRAME_LEN), rows
    cand = np.flatnonzero(buf[: buf.size - FRAME_LEN + 1] == START)
    rows = buf[cand[:, None] + _ARANGE]
    ok = ((rows & _CHECK_MASK) == _CHECK_WANT).all(axis=1)
    cand, rows = cand[ok], rows[ok]
    if verify is not None and cand.size:
        good = np.asarray(verify(rows), bool)
        cand, rows = cand[good], rows[good]
    if cand.size < 2:
        return cand, rows
    conflicts = np.flatnonzero(np.diff(cand) < FRAME_LEN) + 1
    if conflicts.size == 0:
        return cand, rows
    # A candidate starting inside an accepted frame is never looked at by the parser.
    accepted = np.ones(cand.size, bool)
    for k in conflicts.tolist():
        j = k - 1
        while not accepted[j]:
            j -= 1
        accepted[k] = cand[k] >= cand[j] + FRAME_LEN
    return cand[accepted], rows[accepted]


def find_frames(buf: np.ndarray, verify: ChecksumVerifier | None = None) -> np.ndarray:
    """Start offsets of the frames a one-byte-resync parser accepts in `buf` (full frames only)."""
    return _scan(buf, verify)[0]


_Decoded = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


# Each channel's two bytes read as one 16-bit word, high byte in bits 8..15: the sample is
# its HIGH_MASK bits moved down next to its LOW_MASK bits; a flag is a bit of the high byte.
_WORD = {"high-first": np.dtype(">u2"), "low-first": np.dtype("<u2")}
_WORD_HIGH = np.uint16(HIGH_MASK << LOW_BITS)
_FLAG_WORD_BITS = (np.uint16(1) << (FLAG_BIT.astype(np.uint16) + 8)).astype(np.uint16)


def decode_rows(rows: np.ndarray, byte_order: str = "high-first") -> _Decoded:
    """(counter, checksum, counts (n, 8), electrodes (n, 9)) of frames given as bytes (n, 22)."""
    channel_offsets(byte_order)  # raises ValueError naming the valid orders
    if not rows.flags.c_contiguous:
        rows = np.ascontiguousarray(rows)
    payload = rows[:, PAYLOAD_AT : PAYLOAD_AT + 2 * N_CHANNELS]
    words = payload.view(_WORD[byte_order]).astype(np.uint16)
    counts = ((words >> (8 - LOW_BITS)) & _WORD_HIGH) | (words & LOW_MASK)
    flags = (words[:, FLAG_CHANNEL] & _FLAG_WORD_BITS) != 0
    return rows[:, AT_COUNTER] & COUNTER_MASK, rows[:, AT_CHECKSUM], counts, flags


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


def impostors(counter: np.ndarray, prev: int | None, *, trusted: int | None = None,
              steps: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
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
    say nothing about each other. `steps` is counter_steps(counter, prev) if already known.
    """
    c = counter.astype(np.int64)
    n = c.size
    keep = np.ones(n, bool)
    steps = counter_steps(c, prev) if steps is None else steps
    for k in np.flatnonzero(steps != 1).tolist():
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
        self._held: np.ndarray | None = None  # bytes (1, 22) of a frame awaiting its successor
        self._last_counter: int | None = None
        self._last_position = -1
        self._last_arrival: float | None = None
        self.frames_decoded = 0
        self.frames_lost = 0
        self.frames_rejected = 0  # counter fits neither neighbour (see `impostors`)
        self.garbage_bytes = 0
        self.wraps_from_timing = 0
        self.resyncs = 0  # runs of bytes that formed no frame (bad frames, junk), rejected frames
        self._in_junk = False

    @property
    def frames_held(self) -> int:
        """Frames decoded but held back until their successor arrives (0 or 1)."""
        return 0 if self._held is None else 1

    def feed(self, data: bytes | bytearray | memoryview, arrival: float | None = None) -> Frames:
        """Place every complete frame in tail + data; keep an incomplete end for next time."""
        chunk = np.frombuffer(data, np.uint8)
        buf = np.concatenate((self._tail, chunk)) if self._tail.size else chunk
        rows = _aligned(buf, self.verify)
        if rows is not None:  # frames back to back: no junk, nothing to search or count
            self._tail = buf[rows.size :].copy()
            self._in_junk = False
            return self._accept(rows, arrival)
        starts, rows = _scan(buf, self.verify)
        # Everything before the first byte that could still begin a frame is settled.
        settled = max(buf.size - (FRAME_LEN - 1), 0)
        if starts.size:
            settled = max(settled, int(starts[-1]) + FRAME_LEN)
        self.garbage_bytes += settled - FRAME_LEN * int(starts.size)
        self._count_resyncs(starts, settled)
        self._tail = buf[settled:].copy()
        if starts.size == 0:
            return Frames.empty(self.byte_order, arrival)
        return self._accept(rows, arrival)

    def flush(self) -> Frames:
        """The held-back frame, if any, accepted on its predecessor alone (end of stream)."""
        held, self._held = self._held, None
        if held is None:
            return Frames.empty(self.byte_order)
        counter = held[:, AT_COUNTER] & COUNTER_MASK
        return Frames(self._place(counter, 0, 0), counter, held, self.byte_order,
                      self._last_arrival)

    def _accept(self, rows: np.ndarray, arrival: float | None) -> Frames:
        fresh = rows.shape[0]
        if self._held is not None:
            rows = np.concatenate((self._held, rows))
        first_new = rows.shape[0] - fresh  # 1 when a held frame leads the batch
        counter = rows[:, AT_COUNTER] & COUNTER_MASK
        prev = self._last_counter
        n = counter.size
        # The usual chunk: every counter one on from the last.
        start = -1 if prev is None else (prev + 1) % COUNTER_MOD
        clean = start >= 0 and n <= _MAX_RUN and bool(
            (counter == _COUNTING[start : start + n]).all())
        steps = None if clean else counter_steps(counter, prev)
        wraps = 0
        if prev is not None and arrival is not None and self._last_arrival is not None:
            # Second witness: frames the clock says passed since the last chunk vs frames
            # the counter says; the silence, if any, was just before this chunk.
            by_clock = (arrival - self._last_arrival) * self.sampling_rate
            counted = n - first_new if steps is None else int(steps[first_new:].sum())
            extra = by_clock - counted
            if extra > WITNESS_SLACK:
                wraps = int((extra + COUNTER_MOD - WITNESS_SLACK) // COUNTER_MOD)
        if arrival is not None:
            self._last_arrival = arrival
        self._held = None
        if steps is None:  # nothing to judge
            return Frames(self._place(counter, wraps, first_new, clean=True), counter, rows,
                          self.byte_order, arrival)
        keep, hold = impostors(counter, prev, trusted=first_new if wraps else None,
                               steps=steps)
        rejected = int(np.count_nonzero(~keep))
        self.frames_rejected += rejected
        self.resyncs += rejected
        self.garbage_bytes += FRAME_LEN * rejected
        if hold:
            self._held = rows[-1:].copy()
            keep[-1] = False
        if not keep.any():
            return Frames.empty(self.byte_order, arrival)
        counter, rows = counter[keep], rows[keep]
        at = int(np.count_nonzero(keep[:first_new]))  # first kept frame of the new bytes
        return Frames(self._place(counter, wraps, at), counter, rows, self.byte_order, arrival)

    def _count_resyncs(self, starts: np.ndarray, settled: int) -> None:
        if starts.size:
            leading = int(starts[0])
            final = settled - int(starts[-1]) - FRAME_LEN
            runs = int(np.count_nonzero(np.diff(starts) != FRAME_LEN))  # junk between frames
            runs += (leading > 0) + (final > 0)
        else:
            leading = final = settled
            runs = int(final > 0)
        if self._in_junk and leading > 0:
            runs -= 1  # the same run continues from the previous feed
        self.resyncs += runs
        if starts.size or settled:
            self._in_junk = final > 0

    def _place(self, counter: np.ndarray, wraps: int, at: int, *, clean: bool = False
               ) -> np.ndarray:
        """Positions of accepted frames; `wraps` x 64 frames lost just before frame `at`.

        `clean`: every counter is one on from the one before (no need to add up steps).
        """
        if clean:
            position = np.arange(self._last_position + 1, self._last_position + 1 + counter.size)
            if wraps:
                position[at:] += wraps * COUNTER_MOD
        else:
            step = counter_steps(counter, self._last_counter)
            if wraps:
                step[at] += wraps * COUNTER_MOD
            position = self._last_position + np.cumsum(step)
        self.wraps_from_timing += wraps
        self.frames_lost += int(position[-1]) - self._last_position - counter.size
        self.frames_decoded += counter.size
        self._last_counter = int(counter[-1])
        self._last_position = int(position[-1])
        return position
