"""The serial link: a thread that drains the board's port, decodes frames, and reconnects.

The port is a pyserial URL (`/dev/ttyUSB0`, a pty path, `loop://`, `socket://host:port`,
`spy://...`), opened exclusively where the platform supports it. The link is 95.5 % busy,
so the thread never does anything slow: it reads, decodes (a few microseconds of numpy
per chunk) and hands `Frames` to a bounded queue, dropping the OLDEST batch when nobody
consumes (the service between captures). When the adapter vanishes it logs one line,
retries with backoff, and logs one line when the board is back; it never exits.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import serial

from device_agent.errors import SerialLinkError
from device_agent.framing import FrameDecoder, Frames

log = logging.getLogger(__name__)

SILENCE_S = 2.0  # connected but no bytes this long: say so once
# Ask for about 50 ms of link (25 frames) per read: pyserial keeps draining the fd into its
# own buffer while it waits, so nothing backs up in the kernel, and the decoder's fixed
# per-call cost is paid 20 times a second instead of once per byte burst.
READ_CHUNK = 550


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
    dropped_batches: int
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


class SerialReader:
    """Drains one serial port on its own thread into a bounded queue of decoded frames."""

    def __init__(
        self,
        url: str,
        *,
        baudrate: int = 115200,
        decoder: FrameDecoder | None = None,
        queue_size: int = 4000,
        opener: Callable[..., Any] = open_port,
        clock: Callable[[], float] = time.monotonic,
        retry_min_s: float = 0.1,
        retry_max_s: float = 5.0,
    ) -> None:
        self.url = url
        self.baudrate = baudrate
        self.decoder = decoder or FrameDecoder()
        self._queue: queue.Queue[Frames] = queue.Queue(maxsize=queue_size)
        self._opener = opener
        self._clock = clock
        self._retry_min_s, self._retry_max_s = retry_min_s, retry_max_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._port: Any = None
        self._connected = False
        self._last_byte_at: float | None = None
        self._bytes_read = 0
        self._reconnects = 0
        self._dropped = 0
        self._last_error: str | None = None
        self._ever_connected = False

    @classmethod
    def from_settings(cls, settings: Any, url: str | None = None, **kwargs: Any) -> SerialReader:
        """A reader for settings.serial_port (or `url`) decoding with the configured byte order."""
        decoder = kwargs.pop("decoder", None) or FrameDecoder(
            byte_order=settings.byte_order, sampling_rate=settings.sampling_rate)
        return cls(url or settings.serial_port, baudrate=settings.baud_rate, decoder=decoder,
                   **kwargs)

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self, *, fail_fast: bool = False) -> SerialReader:
        """Start the reader thread; with fail_fast, open once here and raise SerialLinkError."""
        if fail_fast:
            self._port = self._opener(self.url, baudrate=self.baudrate)
            self._set_connected(True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"serial-reader {self.url}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread (it checks the stop event at least every read timeout) and close."""
        self._stop.set()
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
        """The next batch of decoded frames, or None after `timeout` seconds."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def clear(self) -> int:
        """Discard queued batches (stale frames from before a capture); returns how many."""
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
                         self._dropped, self._last_error)

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

    def _close(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except (serial.SerialException, OSError) as exc:
                log.debug("closing %s: %s", self.url, exc)

    def _run(self) -> None:
        backoff = self._retry_min_s
        silent_logged = False
        while not self._stop.is_set():
            if self._port is None:
                try:
                    self._port = self._opener(self.url, baudrate=self.baudrate)
                except (SerialLinkError, serial.SerialException, OSError) as exc:
                    self._set_connected(False, str(exc.__cause__ or exc))
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self._retry_max_s)
                    continue
                self._set_connected(True)
                backoff = self._retry_min_s
            try:
                data = self._port.read(max(self._port.in_waiting, READ_CHUNK))
            except (serial.SerialException, OSError, TypeError, AttributeError) as exc:
                # TypeError/AttributeError: pyserial's fd vanished under a concurrent close.
                self._close()
                self._set_connected(False, str(exc))
                continue
            now = self._clock()
            if not data:
                if (self._last_byte_at is not None and not silent_logged
                        and now - self._last_byte_at > SILENCE_S):
                    log.warning("serial port %s open but silent for %.0f s: is the board on?",
                                self.url, now - self._last_byte_at)
                    silent_logged = True
                continue
            if silent_logged:
                log.info("serial port %s: data again", self.url)
                silent_logged = False
            self._last_byte_at = now
            self._bytes_read += len(data)
            frames = self.decoder.feed(data, arrival=now)
            if len(frames):
                self._put(frames)
        self._close()

    def _put(self, frames: Frames) -> None:
        while True:
            try:
                self._queue.put_nowait(frames)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self._dropped += 1
                except queue.Empty:
                    pass
