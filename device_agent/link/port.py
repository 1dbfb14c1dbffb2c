"""The serial link: a thread that drains the board's port, decodes frames, and reconnects.

The port is a pyserial URL (`/dev/ttyUSB0`, a pty path, `loop://`, `socket://host:port`,
`spy://...`), opened exclusively where the platform supports it, its input buffer emptied on
open (bytes from before we held the port are nobody's capture). The link is 95.5 % busy and
the kernel holds what arrives between reads, so the thread wakes a few times a second
(when the kernel's buffer would be about half full, at most every READ_INTERVAL_S), takes
everything waiting in one read (a plain tty: TIOCINQ, then one read(2) of exactly that)
and frames kilobytes at a time: the wake-up and the decoder's fixed cost are paid ~5 times
a second, not per byte burst. Placed `Frames` (samples unpacked only when a consumer asks)
go to a bounded queue that drops the OLDEST batch when nobody consumes (the service between
captures). `clear()` opens a capture window: nothing that arrived before it is handed out.
When the adapter vanishes it logs one line, retries with backoff, and logs one line when
the board is back; it never exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import struct
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import serial

from device_agent.core.errors import SerialLinkError
from device_agent.link.framing import FrameDecoder, Frames

if TYPE_CHECKING:
    from device_agent.core.config import Settings

log = logging.getLogger(__name__)

SILENCE_S = 2.0  # connected but no bytes this long: say so once
# Linux's tty line discipline holds 4096 bytes (N_TTY_BUF_SIZE) for a reader; when it is
# full the kernel throttles a USB-serial adapter, whose own FIFO then overflows: bytes are
# lost. At 115200 baud that is 0.37 s of link. The reader wakes when it would be half full
# (0.19 s of the board's 11,000 B/s), so a late wake-up has another 0.19 s of slack. A pty
# holds more (20 KiB: its flip buffers), so the lab simulator is never the tighter limit.
TTY_BUFFER_BYTES = 4096
READ_INTERVAL_S = 0.2  # the longest sleep between reads, whatever the rate
MIN_INTERVAL_S = 0.002  # the shortest (a simulator at 25x fills the buffer in 15 ms)
# Bytes per read at the board's rate (benchmarks decode in chunks of this size).
READ_CHUNK = int(TTY_BUFFER_BYTES // 2)
_NEARLY_FULL = TTY_BUFFER_BYTES - 512  # a read this big means more may be queued behind it
_MAX_READS = 64  # per wake: 256 KiB, far beyond what the kernel can hold
_REFILL_TRIES = 3  # 1 ms pauses for the kernel to refill after a full read


class Port(Protocol):
    """What the reader needs of a pyserial port (and what a test fake provides)."""

    @property
    def in_waiting(self) -> int: ...

    def read(self, size: int = 1) -> bytes: ...

    def reset_input_buffer(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class LinkState:
    """What the link is doing, for `status` and the capture's messages."""

    url: str
    connected: bool
    last_byte_at: float | None  # monotonic
    bytes_read: int
    frames_decoded: int
    frames_lost: int
    garbage_bytes: int
    reconnects: int
    last_error: str | None

    @property
    def frames(self) -> int:
        """Alias of frames_decoded (status.json's name)."""
        return self.frames_decoded

    @property
    def error(self) -> str | None:
        """Alias of last_error (status.json's name)."""
        return self.last_error


def open_port(url: str, *, baudrate: int = 115200, timeout: float = 0.05) -> serial.SerialBase:
    """Open a port by path or URL, exclusively; raise SerialLinkError saying what to do."""
    try:
        port = serial.serial_for_url(url, baudrate=baudrate, timeout=timeout,
                                     exclusive=True, do_not_open=True)
        port.open()
    except (serial.SerialException, OSError, ValueError) as exc:
        raise SerialLinkError(
            f"cannot open serial port {url}: {exc}; check the board's USB cable and power, "
            f"that no other program holds the port, and ECG_SERIAL_PORT"
        ) from exc
    return port


def _waiting(fd: int) -> int:
    """Bytes the tty on `fd` holds for reading (TIOCINQ); OSError when it is hung up."""
    return int(struct.unpack("I", fcntl.ioctl(fd, termios.TIOCINQ, b"\0\0\0\0"))[0])


def waiting_is_exact(port: Any) -> bool:
    """True when port.in_waiting counts the bytes waiting (a tty, loop://), not 0/1 (socket://)."""
    return isinstance(port, serial.Serial) or type(port).__module__.endswith("protocol_loop")


class FrameSource(Protocol):
    """What a capture reads frames from: a SerialReader, or a test's recording."""

    url: str
    decoder: FrameDecoder  # its resyncs count bad frames; its sampling_rate times the first

    def get(self, timeout: float) -> Frames | None: ...

    def clear(self) -> int: ...

    @property
    def state(self) -> LinkState: ...


class SerialReader:
    """Drains one serial port on its own thread into a bounded queue of decoded frames."""

    def __init__(
        self,
        url: str,
        *,
        baudrate: int = 115200,
        decoder: FrameDecoder | None = None,
        queue_size: int = 600,
        opener: Callable[..., Port] = open_port,
        clock: Callable[[], float] = time.monotonic,
        retry_min_s: float = 0.1,
        retry_max_s: float = 5.0,
        read_interval_s: float = READ_INTERVAL_S,
    ) -> None:
        self.url = url
        self.baudrate = baudrate
        self.decoder = decoder or FrameDecoder()
        # (window, frames): a batch is handed out only in the window it was read in
        self._queue: queue.Queue[tuple[int, Frames]] = queue.Queue(maxsize=queue_size)
        self._opener = opener
        self._clock = clock
        self._retry_min_s, self._retry_max_s = retry_min_s, retry_max_s
        self._read_interval_s = read_interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()  # stop() or clear(): read now
        self._thread: threading.Thread | None = None
        self._port: Port | None = None
        self._exact = True
        self._fd: int | None = None
        self._window = 0  # bumped by clear(); batches of older windows are stale
        self._flushed = 0  # the window whose backlog the thread has discarded
        self._flushed_cond = threading.Condition()
        self._connected = False
        self._last_byte_at: float | None = None
        self._bytes_read = 0
        self._reconnects = 0
        self._last_error: str | None = None
        self._ever_connected = False

    @classmethod
    def from_settings(cls, settings: Settings, url: str | None = None,
                      **kwargs: Any) -> SerialReader:
        """A reader for settings.serial_port (or `url`) decoding with the configured byte order."""
        decoder = kwargs.pop("decoder", None) or FrameDecoder(
            byte_order=settings.byte_order, sampling_rate=settings.sampling_rate)
        return cls(url or settings.serial_port, baudrate=settings.baud_rate, decoder=decoder,
                   **kwargs)

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self, *, fail_fast: bool = False) -> SerialReader:
        """Start the reader thread; with fail_fast, open once here and raise SerialLinkError."""
        if fail_fast:
            self._opened(self._opener(self.url, baudrate=self.baudrate))
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"serial-reader {self.url}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread (it never blocks longer than the port's read timeout) and close."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("serial reader for %s did not stop within %.1f s", self.url, timeout)
            self._thread = None
        self._close()

    def __enter__(self) -> SerialReader:
        return self if self._thread else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- consumer side -----------------------------------------------------------------------
    def get(self, timeout: float) -> Frames | None:
        """The next batch of frames that arrived since the last clear(), or None after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                window, frames = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                return None
            if window == self._window:
                return frames

    def clear(self, timeout: float = 1.0) -> int:
        """Open a capture window: drop every frame that arrived before now; returns batches dropped.

        Queued batches go at once; the bytes in the kernel's buffers (up to a read interval
        of them: read and placed, so positions stay continuous, then dropped; then the
        input buffer is reset for any the kernel had not yet passed on) and a frame the
        decoder holds back are discarded by the reader thread, woken to do it before this
        returns (within `timeout`; a few milliseconds). From then on get() hands out only
        frames whose bytes arrived after the call.
        """
        with self._flushed_cond:
            self._window += 1
            window = self._window
        self._wake.set()
        dropped = self._drop_queued()
        thread = self._thread
        if thread is not None and thread.is_alive():
            with self._flushed_cond:
                done = self._flushed_cond.wait_for(
                    lambda: self._flushed >= window or self._port is None, timeout)
            if not done:
                log.warning("serial reader for %s did not discard its backlog within %.1f s",
                            self.url, timeout)
        return dropped + self._drop_queued()

    def _drop_queued(self) -> int:
        n = 0
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return n
            n += 1

    @property
    def state(self) -> LinkState:
        """A snapshot of the link's state."""
        d = self.decoder
        return LinkState(self.url, self._connected, self._last_byte_at, self._bytes_read,
                         d.frames_decoded, d.frames_lost, d.garbage_bytes, self._reconnects,
                         self._last_error)

    # --- the thread --------------------------------------------------------------------------
    def _set_connected(self, connected: bool, error: str | None = None) -> None:
        if connected and not self._connected:
            if self._ever_connected:
                self._reconnects += 1
                log.info("serial port %s is back (reconnect %d)", self.url, self._reconnects)
            else:
                log.info("serial port %s open", self.url)
            self._ever_connected = True
        elif not connected and (self._connected or error != self._last_error):
            if self._connected:
                log.warning("serial port %s lost: %s; reconnecting until it is back",
                            self.url, error)
            elif not self._ever_connected:
                log.warning("cannot open serial port %s: %s; retrying until it appears",
                            self.url, error)
        if error:
            self._last_error = error
        self._connected = connected

    def _opened(self, port: Port) -> None:
        """Take a freshly opened port: drop what the kernel buffered before it was ours."""
        window = self._window  # before the reset: a clear() during it still gets its discard
        try:
            port.reset_input_buffer()
        except (serial.SerialException, OSError) as exc:
            port.close()
            raise SerialLinkError(f"cannot reset serial port {self.url}: {exc}; check the "
                                  "board's USB cable") from exc
        self._port = port
        self._exact = waiting_is_exact(port)
        # pyserial's own posix port (not spy://, which logs what it reads): read its fd
        self._fd = (port.fileno() if isinstance(port, serial.Serial)
                    and type(port) is serial.Serial else None)
        self._set_connected(True)
        self._mark_flushed(window)  # the reset was this window's discard

    def _close(self) -> None:
        with self._flushed_cond:
            port, self._port = self._port, None
            self._flushed_cond.notify_all()  # a clear() waiting on this port need not
        if port is not None:
            try:
                port.close()
            except (serial.SerialException, OSError) as exc:
                log.debug("closing %s: %s", self.url, exc)

    def _mark_flushed(self, window: int) -> None:
        with self._flushed_cond:
            self._flushed = window
            self._flushed_cond.notify_all()

    def _drain(self, port: Port) -> bytes:
        """Everything the port holds now, without waiting for more (except on silence)."""
        if self._fd is not None:
            return self._drain_fd(self._fd)
        chunks: list[bytes] = []
        for _ in range(_MAX_READS):
            n = port.in_waiting
            if not n:
                if not chunks:
                    # Nothing waiting: one byte with the port's timeout, so a vanished
                    # adapter ("readiness to read but returned no data") is noticed.
                    return port.read(1)
                break
            chunks.append(port.read(n if self._exact else max(n, READ_CHUNK)))
            if len(chunks[-1]) < _NEARLY_FULL:
                break
        return b"".join(chunks)

    def _drain_fd(self, fd: int) -> bytes:
        """A plain tty: ask the kernel how much is waiting, read exactly that (one read(2)).

        A hung-up tty (adapter gone, pty closed) fails the ioctl with EIO. The tty holds at
        most its line buffer; a read that emptied a full one is followed by another, after a
        moment for the kernel to refill it from its flip buffers, or the arrival clock would
        count bytes still queued as frames lost.
        """
        chunks: list[bytes] = []
        refills = 0
        for _ in range(_MAX_READS):
            n = _waiting(fd)
            if not n:
                if (chunks and len(chunks[-1]) >= _NEARLY_FULL and refills < _REFILL_TRIES
                        and not self._stop.is_set()):
                    refills += 1
                    self._stop.wait(0.001)
                    continue
                break
            data = os.read(fd, n)
            if not data:
                raise serial.SerialException(f"{self.url}: {n} bytes waiting but none read "
                                             "(device disconnected?)")
            chunks.append(data)
            if len(data) < _NEARLY_FULL:
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _next_wait(self, nbytes: int, elapsed: float) -> float:
        """Sleep until the kernel's buffer would be half full at the rate just seen."""
        rate = nbytes / elapsed if elapsed > 0 and nbytes else 0.0
        if rate <= 0:
            return self._read_interval_s
        return min(self._read_interval_s, max(MIN_INTERVAL_S, READ_CHUNK / rate))

    def _run(self) -> None:
        backoff = self._retry_min_s
        silent_logged = False
        wait = 0.0
        last_read = self._clock()
        while not self._stop.is_set():
            if self._port is None:
                try:
                    self._opened(self._opener(self.url, baudrate=self.baudrate))
                except (SerialLinkError, serial.SerialException, OSError) as exc:
                    self._set_connected(False, str(exc.__cause__ or exc))
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self._retry_max_s)
                    continue
                backoff = self._retry_min_s
                wait, last_read = 0.0, self._clock()
            if self._wake.wait(wait):
                self._wake.clear()
                if self._stop.is_set():
                    break
            window = self._window  # read before the bytes: a clear() after it wins
            port = self._port
            assert port is not None
            try:
                data = self._drain(port)
            except (serial.SerialException, OSError, TypeError, AttributeError) as exc:
                # TypeError/AttributeError: pyserial's fd vanished under a concurrent close.
                self._close()
                self._set_connected(False, str(exc))
                continue
            now = self._clock()
            wait, last_read = self._next_wait(len(data), now - last_read), now
            if not data:
                if (self._last_byte_at is not None and not silent_logged
                        and now - self._last_byte_at > SILENCE_S):
                    log.warning("serial port %s open but silent for %.0f s: is the board on?",
                                self.url, now - self._last_byte_at)
                    silent_logged = True
                if window != self._flushed:
                    self._flush(port, window)
                continue
            if silent_logged:
                log.info("serial port %s: data again", self.url)
                silent_logged = False
            self._last_byte_at = now
            self._bytes_read += len(data)
            frames = self.decoder.feed(data, arrival=now)
            if window != self._flushed:
                self._flush(port, window)  # these bytes arrived before the clear() that asked
            elif len(frames):
                self._put(window, frames)
        self._close()

    def _flush(self, port: Port, window: int) -> None:
        """Discard, for a new capture window, the frames read just now, the one held back and
        any bytes the kernel got too late for that read (still in its flip buffers)."""
        self.decoder.flush()
        try:
            port.reset_input_buffer()
        except (serial.SerialException, OSError) as exc:
            log.debug("serial port %s: input buffer not reset: %s", self.url, exc)
        self._mark_flushed(window)
        log.debug("serial port %s: backlog discarded for a new capture window", self.url)

    def _put(self, window: int, frames: Frames) -> None:
        while True:
            try:
                self._queue.put_nowait((window, frames))
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):  # nobody reads (idle): the oldest goes
                    self._queue.get_nowait()
