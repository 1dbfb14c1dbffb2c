"""A board simulator on a pseudo-terminal: real WFDB records streamed as board frames.

A field engineer (and the tests) point the agent at `--link`, a symlink to the pty's
slave, and get the board's 22-byte frames at 500 Hz (x speed), with faults on request.
Records at another rate are resampled to 500 Hz: for an integer factor m (1000 Hz -> m=2)
a centred triangular moving average of 2m-1 taps (anti-alias, no time shift) then every
m-th sample; otherwise linear interpolation. Microvolts become counts with the reader's
counts_per_mv and a per-channel offset near mid-scale, clipped to 0..4095. An electrode
fault clears that electrode's flag and leaves the counts as they are.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import math
import os
import select
import threading
import time
import tty
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.core.record import ELECTRODES, MEASURED_LEADS
from device_agent.lab.wfdb import read_record
from device_agent.link.framing import (
    AT_CHECKSUM,
    AT_COUNTER,
    AT_END,
    AT_LENGTH,
    AT_OPCODE,
    AT_START,
    COUNTER_MASK,
    END,
    FLAG_BIT,
    FLAG_CHANNEL,
    FRAME_LEN,
    HIGH_MASK,
    LENGTH,
    LOW_BITS,
    LOW_MASK,
    N_CHANNELS,
    OPCODE,
    PAYLOAD_AT,
    START,
    channel_offsets,
)

log = logging.getLogger(__name__)

RATE = 500
# Zero-signal level of each channel, near mid-scale like a real board (1850..2050).
MID_SCALE = np.array([2048, 2010, 1990, 2030, 1970, 2000, 2040, 1960], dtype=np.int64)
_MAX_PENDING = 256 * 1024  # bytes held while a reader is behind; beyond that they are lost


@dataclass(frozen=True)
class FaultSpec:
    """Faults to inject; rates are probabilities, times are seconds of signal."""

    drop: float = 0.0  # per byte: the byte is lost
    garbage: float = 0.0  # per frame: a burst of 1..30 junk bytes (E8/8E likely) before it
    lose: float = 0.0  # per frame: the whole frame is lost
    electrode: tuple[tuple[str, float, float], ...] = ()  # (electrode, from_s, to_s) off
    stall: tuple[float, float] | None = None  # (duration_s, at_s): silence, frames lost
    unplug: tuple[float, float] | None = None  # (duration_s, at_s): pty gone, then a new one

    @classmethod
    def parse(cls, spec: str) -> FaultSpec:
        """Parse `drop=0.001,garbage=0.0005,lose=0.002,electrode=LA@2-4,stall=3@1.5,unplug=5@1`."""
        values: dict[str, Any] = {}
        electrodes = []
        for item in filter(None, (part.strip() for part in spec.split(","))):
            key, _, value = item.partition("=")
            try:
                if key in ("drop", "garbage", "lose"):
                    values[key] = float(value)
                    if not 0 <= values[key] <= 1:
                        raise ValueError
                elif key == "electrode":
                    name, _, span = value.partition("@")
                    start, _, end = span.partition("-")
                    if name not in ELECTRODES:
                        raise ValueError
                    electrodes.append((name, float(start), float(end)))
                elif key in ("stall", "unplug"):
                    duration, _, at = value.partition("@")
                    values[key] = (float(duration), float(at or 0))
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(
                    f"fault {item!r} not understood: use drop=P, garbage=P, lose=P, "
                    f"electrode=NAME@FROM-TO ({'/'.join(ELECTRODES)}), stall=S@AT, unplug=S@AT"
                ) from None
        return cls(electrode=tuple(electrodes), **values)


def resample(signals: np.ndarray, rate: float, target: int = RATE) -> np.ndarray:
    """Signals (leads, n) at `rate` to `target` Hz (see the module docstring for how)."""
    if rate == target:
        return signals.astype(np.float64)
    factor = rate / target
    if factor == int(factor) and factor > 1:
        m = int(factor)
        taps = np.convolve(np.ones(m), np.ones(m))
        taps /= taps.sum()
        padded = np.pad(signals, ((0, 0), (m - 1, m - 1)), mode="edge")
        smooth = np.stack([np.convolve(row, taps, mode="valid") for row in padded])
        return smooth[:, ::m]
    n_out = int(signals.shape[1] / factor)
    t_out = np.arange(n_out) * factor
    t_in = np.arange(signals.shape[1])
    return np.stack([np.interp(t_out, t_in, row) for row in signals]).astype(np.float64)


def record_counts(record_path: Path | str, counts_per_mv: float) -> np.ndarray:
    """The 8 measured leads of a WFDB record as the board's counts, (n, 8) uint16 at 500 Hz."""
    rec = read_record(record_path)
    uv = np.stack([rec.lead(name) for name in MEASURED_LEADS])
    uv = resample(uv, rec.sampling_rate)
    counts = np.rint(uv * (counts_per_mv / 1000.0)).astype(np.int64) + MID_SCALE[:, None]
    board: np.ndarray = np.clip(counts, 0, 4095).astype(np.uint16).T.copy()
    return board


def encode_frames(
    counts: np.ndarray, counters: np.ndarray, electrodes: np.ndarray | None = None,
    byte_order: str = "high-first",
) -> np.ndarray:
    """Frames (n, 22) uint8 for counts (n, 8), counters (n,) and flags (n, 9, True = on).

    The inverse of framing.decode_rows, from the same layout table (framing.py).
    """
    n = counts.shape[0]
    if electrodes is None:
        electrodes = np.ones((n, len(ELECTRODES)), bool)
    counts = counts.astype(np.uint16)
    hi = ((counts >> LOW_BITS) & HIGH_MASK).astype(np.uint8)
    lo = (counts & LOW_MASK).astype(np.uint8)
    flag_bits = np.asarray(electrodes, bool).astype(np.uint16) << FLAG_BIT  # (n, 9)
    owner = np.zeros((len(ELECTRODES), N_CHANNELS), np.uint16)
    owner[np.arange(len(ELECTRODES)), FLAG_CHANNEL] = 1  # a channel's flag bits never overlap
    hi |= (flag_bits @ owner).astype(np.uint8)
    out = np.zeros((n, FRAME_LEN), np.uint8)
    out[:, AT_START], out[:, AT_LENGTH], out[:, AT_OPCODE], out[:, AT_END] = (
        START, LENGTH, OPCODE, END)
    out[:, AT_COUNTER] = np.asarray(counters, np.int64) & COUNTER_MASK
    hi_off, lo_off = channel_offsets(byte_order)
    out[:, hi_off], out[:, lo_off] = hi, lo
    out[:, AT_CHECKSUM] = payload_sum(out)
    return out


def payload_sum(frames: np.ndarray) -> np.ndarray:
    """The simulator's checksum of frames (n, 22): the board's is unknown, so a payload byte sum."""
    payload = frames[:, PAYLOAD_AT : PAYLOAD_AT + 2 * N_CHANNELS]
    total: np.ndarray = (payload.sum(axis=1, dtype=np.int64) & 0xFF).astype(np.uint8)
    return total


def verify_payload_sum(frames: np.ndarray) -> np.ndarray:
    """A FrameDecoder checksum verifier for the simulator's frames (tests, lab runs)."""
    ok: np.ndarray = frames[:, AT_CHECKSUM] == payload_sum(frames)
    return ok


@dataclass
class Truth:
    """What the simulator did to the stream, by frame number (= sample index streamed)."""

    lost: set[int] = field(default_factory=set)  # never sent (lose, stall, unplug)
    damaged: set[int] = field(default_factory=set)  # sent with a byte dropped
    garbage_bytes: int = 0
    frames_sent: int = 0
    bytes_written: int = 0  # handed to the pty
    bytes_discarded: int = 0  # lost: nobody held the port, or a reader fell far behind


def inject(
    frames: np.ndarray, numbers: np.ndarray, faults: FaultSpec, rng: np.random.Generator,
    truth: Truth,
) -> bytes:
    """Apply lose/drop/garbage faults to frames (n, 22) numbered `numbers`; the bytes to send."""
    keep = np.ones(len(frames), bool)
    if faults.lose:
        keep &= rng.random(len(frames)) >= faults.lose
        truth.lost.update(int(x) for x in numbers[~keep])
    frames, numbers = frames[keep], numbers[keep]
    truth.frames_sent += len(frames)
    if not faults.drop and not faults.garbage:
        return frames.tobytes()
    byte_keep = np.ones(frames.shape, bool)
    if faults.drop:
        byte_keep = rng.random(frames.shape) >= faults.drop
        truth.damaged.update(int(x) for x in numbers[~byte_keep.all(axis=1)])
    flat = frames.reshape(-1)[byte_keep.reshape(-1)]
    if faults.garbage:
        bursts = np.flatnonzero(rng.random(len(frames)) < faults.garbage)
        if bursts.size:
            sizes = rng.integers(1, 31, size=bursts.size)
            junk = rng.integers(0, 256, size=int(sizes.sum()), dtype=np.uint8)
            junk[rng.random(junk.size) < 0.3] = START
            junk[rng.random(junk.size) < 0.2] = END
            row_start = np.concatenate(([0], np.cumsum(byte_keep.sum(axis=1))[:-1]))
            flat = np.insert(flat, np.repeat(row_start[bursts], sizes), junk)
            truth.garbage_bytes += int(junk.size)
    return flat.tobytes()


DRAIN_S = 1.0  # after the last frame is due, how long unread bytes wait for a reader
SEAM_WINDOW = 10  # samples each side of a loop seam compared to choose where it goes
SEAM_SEARCH = 5  # samples either side of the later beat searched for the best match


def loop_span(counts: np.ndarray, counts_per_mv: float, fs: float = RATE) -> tuple[int, int]:
    """(start, end) of a seamless loop: from an R peak to the same point of a later beat.

    Playing counts[start:end] over and over joins the signal at a QRS, one beat meeting the
    next as in the recording, instead of cutting a beat in half. Beats are found on lead II
    (qrs.detect). Of the pairs of beats at least half the recording apart, with the end
    shifted up to SEAM_SEARCH samples to line the two beats up (keeping the interval into
    the seam within the recording's own RR range), the one whose seam looks most like the
    recording is taken: the step across the seam, which should be no larger than the
    recording's own, and the mismatch of the two beats' neighbourhoods, each lead in units
    of its largest sample-to-sample step. Without two such beats: the whole record.
    """
    from device_agent.clinical.qrs import detect

    n = counts.shape[0]
    x = counts.astype(np.float64)
    ii = x[:, MEASURED_LEADS.index("II")]
    beats = detect((ii - np.median(ii)) * (1000.0 / counts_per_mv), fs).beats
    scale = np.maximum(np.abs(np.diff(x, axis=0)).max(axis=0), 1.0)
    rr = np.diff(beats)
    w = SEAM_WINDOW
    offsets = np.arange(-w, w)
    shifts = np.arange(-SEAM_SEARCH, SEAM_SEARCH + 1)
    best: tuple[float, int, int] | None = None
    for i in beats[(beats >= w) & (beats < n - w)].tolist():
        q = np.flatnonzero((beats - i >= n // 2) & (np.arange(beats.size) > 0))
        if q.size == 0:
            break
        k = (beats[q, None] + shifts).ravel()
        prev = np.repeat(beats[q - 1], shifts.size)  # the beat before the seam
        ok = (k >= w) & (k <= n - w) & (k - prev >= rr.min()) & (k - prev <= rr.max())
        k = k[ok]
        if k.size == 0:
            continue
        step = (np.abs(x[i] - x[k - 1]) / scale).max(axis=1)
        near = (np.abs(x[i + offsets] - x[k[:, None] + offsets]) / scale).mean(axis=1).max(axis=1)
        cost = near + step + 1000.0 * (step > 1)  # a step beyond the recording's own: last resort
        m = int(np.argmin(cost))
        if best is None or cost[m] < best[0]:
            best = (float(cost[m]), i, int(k[m]))
    if best is None:
        log.warning("simulator: no two clear beats on lead II; the loop joins end to start")
        return 0, n
    return best[1], best[2]


class BoardSimulator:
    """Streams a record as board frames into a pty reached through `link_path`."""

    def __init__(
        self,
        record_path: Path | str,
        link_path: Path | str,
        *,
        counts_per_mv: float,
        byte_order: str = "high-first",
        speed: float = 1.0,
        loop: bool = False,
        faults: FaultSpec | None = None,
        seed: int = 0,
        seconds: float | None = None,
    ) -> None:
        if not (isinstance(speed, int | float) and math.isfinite(speed) and speed > 0):
            raise ValueError(f"simulator speed {speed!r} is not valid: use a number above 0 "
                             "(1 = real time, 10 = ten times faster)")
        self.link = Path(link_path)
        if not self.link.parent.is_dir():
            raise FileNotFoundError(f"simulator link {self.link}: folder {self.link.parent} "
                                    "does not exist; create it or choose another link path")
        self.counts = record_counts(record_path, counts_per_mv)
        self.byte_order = byte_order
        self.speed = float(speed)
        self.loop = loop
        self.faults = faults or FaultSpec()
        self.truth = Truth()
        self._rng = np.random.default_rng(seed)
        n = self.counts.shape[0]
        # counts[start:end] repeats after the first pass (loop_span: the seam is at a beat)
        self.span = loop_span(self.counts, counts_per_mv) if loop else (0, n)
        limit = int(seconds * RATE) if seconds is not None else None
        self.total = limit if limit is not None else (None if loop else n)
        self.sent = 0  # frames generated and handed on (written, waiting, or lost unread)
        self._master: int | None = None
        self._slave_path: str | None = None
        self._pty_lock = threading.RLock()  # RLock: stop() may run in a signal handler
        self._stop = threading.Event()
        self.finished = threading.Event()
        self.replugged = threading.Event()
        self._thread: threading.Thread | None = None

    def source_index(self, numbers: np.ndarray) -> np.ndarray:
        """Index into `counts` of the sample streamed as each frame number."""
        numbers = np.asarray(numbers, np.int64)
        start, end = self.span
        if not self.loop:
            return numbers
        return np.where(numbers < end, numbers, start + (numbers - end) % (end - start))

    # --- the pty and its link ---------------------------------------------------------------
    def open(self) -> str:
        """Create a pty, set it raw, point the link at its slave; returns the slave path."""
        with self._pty_lock:
            master, slave = os.openpty()
            tty.setraw(slave)
            path = os.ttyname(slave)
            os.close(slave)  # the reader opens it by the link; the master keeps the pty alive
            flags = fcntl.fcntl(master, fcntl.F_GETFL)
            fcntl.fcntl(master, fcntl.F_SETFL, flags | os.O_NONBLOCK)
            tmp = self.link.with_name(self.link.name + ".tmp")
            tmp.unlink(missing_ok=True)
            os.symlink(path, tmp)
            os.replace(tmp, self.link)  # atomic re-point: a reader never sees a half state
            self._master, self._slave_path = master, path
        log.info("simulator: board on %s (link %s)", path, self.link)
        return path

    def _unplug(self) -> None:
        with self._pty_lock:
            if self._master is not None:
                os.close(self._master)
                self._master = None
            self._remove_link()
        log.info("simulator: unplugged %s", self.link)

    def _remove_link(self) -> None:
        """Remove the link if it still points to our pty (another program may have re-pointed
        it, and a pty number is soon reused: a stale link would lead a reader to a stranger)."""
        try:
            if self._slave_path is not None and os.readlink(self.link) == self._slave_path:
                self.link.unlink()
        except OSError:  # gone already, or not a link
            pass

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> BoardSimulator:
        """Open the pty (if not yet) and start streaming on a thread."""
        if self._master is None:
            self.open()
        self._thread = threading.Thread(target=self._run, name="board-simulator", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop streaming, close the pty and remove our link (safe from a signal handler)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._unplug()

    def __enter__(self) -> BoardSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- streaming ---------------------------------------------------------------------------
    def _frames(self, first: int, last: int) -> bytes:
        """Bytes for frame numbers first..last-1, with every fault applied."""
        numbers = np.arange(first, last)
        t = numbers / RATE
        silent = np.zeros(numbers.size, bool)
        for window in (self.faults.stall, self.faults.unplug):
            if window:
                silent |= (t >= window[1]) & (t < window[1] + window[0])
        self.truth.lost.update(int(x) for x in numbers[silent])
        numbers = numbers[~silent]
        if numbers.size == 0:
            return b""
        counts = self.counts[self.source_index(numbers)]
        flags = np.ones((numbers.size, len(ELECTRODES)), bool)
        for name, start, end in self.faults.electrode:
            flags[(t[~silent] >= start) & (t[~silent] < end), ELECTRODES.index(name)] = False
        frames = encode_frames(counts, numbers, flags, self.byte_order)
        return inject(frames, numbers, self.faults, self._rng, self.truth)

    def _plugged(self, frame: int) -> bool:
        if not self.faults.unplug:
            return True
        duration, at = self.faults.unplug
        return not at * RATE <= frame < (at + duration) * RATE

    def _run(self) -> None:
        pending = bytearray()
        sent = 0
        tick = max(0.002, 0.01 / self.speed)  # about 10 ms of signal per write
        t0 = time.monotonic()
        done_at = 0.0
        try:
            while not self._stop.is_set():
                due = int((time.monotonic() - t0) * RATE * self.speed)
                if self.total is not None:
                    due = min(due, self.total)
                if due > sent:
                    if not self._plugged(sent) and self._master is not None:
                        self._unplug()
                        pending.clear()
                    elif self._plugged(sent) and self._master is None:
                        self.open()
                        self.replugged.set()
                    pending += self._frames(sent, due)
                    sent = due
                if self._master is not None and pending:
                    pending = self._write(pending)
                elif self._master is None:
                    pending.clear()
                self.sent = sent
                if self.total is not None and sent >= self.total:
                    if not pending:
                        break
                    # Signal over: give a reader a second to take the rest; a board nobody
                    # reads just loses it (and the simulator must still end).
                    done_at = done_at or time.monotonic()
                    if time.monotonic() - done_at > DRAIN_S:
                        self.truth.bytes_discarded += len(pending)
                        break
                self._stop.wait(tick)
        except OSError:
            log.exception("simulator: stopped on an error")
        finally:
            self.finished.set()

    def _write(self, pending: bytearray) -> bytearray:
        """Write what the pty takes. A board whose port nobody holds open loses the rest (a
        reader that opens later must not get seconds-old frames); one whose reader is slow
        keeps up to _MAX_PENDING bytes, the slack a fast replay needs."""
        with self._pty_lock:
            master = self._master
            if master is None:
                return pending
            try:
                poller = select.poll()
                poller.register(master, select.POLLOUT)
                events = dict(poller.poll(0)).get(master, 0)
                if events & select.POLLOUT:
                    written = os.write(master, pending)
                    self.truth.bytes_written += written
                    del pending[:written]
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EIO):
                    raise
                events = 0
        nobody = bool(events & select.POLLHUP)  # no process holds the slave open
        if pending and (nobody or len(pending) > _MAX_PENDING):
            self.truth.bytes_discarded += len(pending)
            pending.clear()
        return pending
