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
import os
import select
import threading
import time
import tty
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device_agent.framing import (
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
from device_agent.lab.wfdb import read_record
from device_agent.record import ELECTRODES, MEASURED_LEADS

log = logging.getLogger(__name__)

RATE = 500
# Zero-signal level of each channel, near mid-scale like a real board (1850..2050).
MID_SCALE = np.array([2048, 2010, 1990, 2030, 1970, 2000, 2040, 1960], dtype=np.int64)
_MAX_PENDING = 256 * 1024  # bytes held while nobody reads; beyond that they are lost


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
        values: dict = {}
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
    return np.stack([np.interp(t_out, t_in, row) for row in signals])


def record_counts(record_path: Path | str, counts_per_mv: float) -> np.ndarray:
    """The 8 measured leads of a WFDB record as the board's counts, (n, 8) uint16 at 500 Hz."""
    rec = read_record(record_path)
    uv = np.stack([rec.lead(name) for name in MEASURED_LEADS])
    uv = resample(uv, rec.sampling_rate)
    counts = np.rint(uv * (counts_per_mv / 1000.0)).astype(np.int64) + MID_SCALE[:, None]
    return np.clip(counts, 0, 4095).astype(np.uint16).T.copy()


def encode_frames(
    counts: np.ndarray, counters: np.ndarray, electrodes: np.ndarray | None = None,
    byte_order: str = "high-first",
) -> np.ndarray:
    """Frames (n, 22) uint8 for counts (n, 8), counters (n,) and flags (n, 9, True = on).

    The inverse of framing.decode_frames, from the same layout table (framing.py).
    """
    n = counts.shape[0]
    if electrodes is None:
        electrodes = np.ones((n, len(ELECTRODES)), bool)
    counts = counts.astype(np.uint16)
    hi = ((counts >> LOW_BITS) & HIGH_MASK).astype(np.uint8)
    lo = (counts & LOW_MASK).astype(np.uint8)
    flag_bits = (np.asarray(electrodes, bool).astype(np.uint8) << FLAG_BIT).astype(np.uint8)
    np.bitwise_or.at(hi, (slice(None), FLAG_CHANNEL), flag_bits)
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
    return (payload.sum(axis=1, dtype=np.int64) & 0xFF).astype(np.uint8)


def verify_payload_sum(frames: np.ndarray) -> np.ndarray:
    """A FrameDecoder checksum verifier for the simulator's frames (tests, lab runs)."""
    return frames[:, AT_CHECKSUM] == payload_sum(frames)


@dataclass
class Truth:
    """What the simulator did to the stream, by frame number (= sample index streamed)."""

    lost: set[int] = field(default_factory=set)  # never sent (lose, stall, unplug)
    damaged: set[int] = field(default_factory=set)  # sent with a byte dropped
    garbage_bytes: int = 0
    frames_sent: int = 0
    bytes_discarded: int = 0  # written while nobody read and the buffer was full


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
        if speed <= 0:
            raise ValueError(f"speed {speed}: must be above 0")
        self.counts = record_counts(record_path, counts_per_mv)
        self.link = Path(link_path)
        self.byte_order = byte_order
        self.speed = float(speed)
        self.loop = loop
        self.faults = faults or FaultSpec()
        self.truth = Truth()
        self._rng = np.random.default_rng(seed)
        n = self.counts.shape[0]
        limit = int(seconds * RATE) if seconds is not None else None
        self.total = limit if limit is not None else (None if loop else n)
        self._master: int | None = None
        self._slave_path: str | None = None
        self._stop = threading.Event()
        self.finished = threading.Event()
        self.replugged = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the pty and its link ---------------------------------------------------------------
    def open(self) -> str:
        """Create a pty, set it raw, point the link at its slave; returns the slave path."""
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
        if self._master is not None:
            os.close(self._master)
            self._master = None
        if self.link.is_symlink():
            self.link.unlink()
        log.info("simulator: unplugged %s", self.link)

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> BoardSimulator:
        """Open the pty (if not yet) and start streaming on a thread."""
        if self._master is None:
            self.open()
        self._thread = threading.Thread(target=self._run, name="board-simulator", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop streaming, close the pty and remove the link."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
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
        counts = self.counts[numbers % self.counts.shape[0]]
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
        assert self._master is not None
        try:
            _, writable, _ = select.select([], [self._master], [], 0)
            if writable:
                written = os.write(self._master, pending)
                del pending[:written]
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EIO):
                raise
        if len(pending) > _MAX_PENDING:  # like a board nobody reads: bytes are lost
            self.truth.bytes_discarded += len(pending)
            pending.clear()
        return pending


def cmd_simulate(settings, args) -> int:
    """`device-agent simulate`: stream a record into a pty until done or interrupted."""
    from device_agent.cli import echo

    try:
        faults = FaultSpec.parse(args.faults or "")
    except ValueError as exc:
        from device_agent.errors import ConfigError

        raise ConfigError(f"--faults: {exc}") from None
    record = args.record
    if record is None:
        from device_agent.lab.demo import default_record

        record = default_record()
    hea = record if Path(record).suffix == ".hea" else Path(f"{record}.hea")
    if not hea.exists():
        from device_agent.errors import ConfigError

        raise ConfigError(f"--record {record}: no WFDB header {hea}; name a .hea file or its "
                          "stem, or leave --record out to replay the shipped recording")
    sim = BoardSimulator(
        record, args.link, counts_per_mv=settings.counts_per_mv,
        byte_order=settings.byte_order, speed=args.speed, loop=args.loop, faults=faults,
        seconds=args.seconds,
    )
    sim.start()
    echo(f"simulating {Path(record).name} on {args.link} at {args.speed:g}x "
         f"(ECG_COUNTS_PER_MV={settings.counts_per_mv:g}); Ctrl-C to stop")
    try:
        while not sim.finished.wait(0.5):
            pass
    finally:
        sim.stop()
    t = sim.truth
    echo(f"sent {t.frames_sent} frames; lost {len(t.lost)}, damaged {len(t.damaged)}, "
         f"garbage bytes {t.garbage_bytes}, unread bytes discarded {t.bytes_discarded}")
    return 0
