"""The running service: supervises the serial reader, the sync loop and captures.

Threads: the serial reader (port.py, its own thread, reconnects forever), the sync loop
(sync.py, every SYNC_INTERVAL_S), one capture at a time when a request arrives through the
spool, and this supervising loop on the calling thread, which feeds the systemd watchdog,
publishes STATUS= and STATE_DIR/status.json, and claims capture requests. Every wait is
`stop.wait()`, so the service stops promptly once `stop` is set.

The watchdog is fed only while the sync loop makes progress or has nothing to do: an upload
or a step wedged past every deadline it has stops the WATCHDOG=1 pings, and systemd restarts
the service. status.json carries the clock as the service sees it (inside its sandbox), so
`doctor` can report that rather than its own view.

A board that is absent at boot does not hold the service back: READY=1 goes out once the
outbox is open and the port has had a short grace period to open, with STATUS "waiting for
board on PORT". Capture requests made while the board is absent are answered with a clear
error instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from device_agent import __version__
from device_agent.capture import capture_package, find_capture, kept_answer, rejection_message
from device_agent.core.clock import Clock, held_count
from device_agent.core.config import Settings
from device_agent.core.errors import AgentError
from device_agent.core.fsutil import storage_condition, storage_message
from device_agent.documents.patient import validate_patient
from device_agent.link.port import FrameSource
from device_agent.ops.notify import Notifier
from device_agent.ops.spool import Request, Spool, record_id_for
from device_agent.ops.status import (
    CaptureDoc,
    ClockDoc,
    PortDoc,
    StatusDoc,
    SyncDoc,
    write_status_file,
)
from device_agent.shipping.outbox import Outbox
from device_agent.sync import ConditionLog, PassResult

log = logging.getLogger(__name__)

# Supervising loop period: capture requests are picked up within it (a capture is 10 s of
# board data); a stop needs no tick (stop.wait returns at once). Each wake-up costs a Pi
# CPU whether or not there is work, so it is no shorter than pickup needs.
TICK_S = 0.5
# spool/new's mtime has the kernel's coarse tick: a request renamed in within the same tick
# as the last listing leaves it unchanged, so a folder changed this recently is listed anyway
SPOOL_SETTLE_S = 1.0
# status.json and STATUS= heartbeat (stale after status.STALE_AFTER_S = 30 s); a capture's
# end, a wedged sync loop and the board coming or going publish at once
PUBLISH_EVERY_S = 10.0
READY_GRACE_S = 3.0     # how long READY waits for the port before saying "waiting for board"
RESULT_KEEP_S = 3600.0  # unread capture results are deleted after this

# A capture request's answer, as the spool hands it to the waiting caller (JSON).
CaptureResult = dict[str, Any]
CaptureFn = Callable[[Request], CaptureResult]
# The answer for a request the last restart cut short whose capture was kept, or None.
KeptFn = Callable[[str], CaptureResult | None]


class Link(Protocol):
    """What the service reads of the board link's state (port.LinkState)."""

    @property
    def connected(self) -> bool: ...

    @property
    def last_byte_at(self) -> float | None: ...  # monotonic

    @property
    def frames_decoded(self) -> int: ...

    @property
    def reconnects(self) -> int: ...

    @property
    def last_error(self) -> str | None: ...


class Reader(Protocol):
    """The board link as the service supervises it (port.SerialReader); the captures use the
    reader itself (PackageCapture)."""

    @property
    def state(self) -> Link: ...

    def start(self) -> object: ...

    def stop(self) -> None: ...


OnPass = Callable[[PassResult | None, list[str]], None]


class SyncRunner(Protocol):
    """The sync loop as the service supervises it (sync.SyncLoop)."""

    conditions: ConditionLog  # shared with the status writer: a full disk is logged once

    def run(self, *, on_pass: OnPass) -> None: ...

    def stuck(self) -> str | None: ...

    def close(self) -> None: ...


class QueueStats(Protocol):
    """What the status line says of the queue (outbox.Stats)."""

    @property
    def pending(self) -> int: ...

    @property
    def failed(self) -> int: ...

    @property
    def paused_until(self) -> float | None: ...

    @property
    def last_delivered_at(self) -> float | None: ...


class StatsSource(Protocol):
    """All the service needs of the outbox: its numbers (outbox.Outbox.stats)."""

    def stats(self) -> QueueStats: ...


def release_memory() -> None:
    """Hand the heap a capture used (frames, JSON text, PDF paths) back to the OS."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _now_iso(clock: Clock) -> str:
    return clock.now().isoformat(timespec="seconds")


class Service:
    """The running agent: supervises reader, sync loop and captures; `run()` until `stop`."""

    def __init__(self, settings: Settings, *, reader: Reader, sync_loop: SyncRunner,
                 outbox: StatsSource, capture: CaptureFn, kept: KeptFn, notifier: Notifier,
                 stop: threading.Event, clock: Clock,
                 credentials: Callable[[], dict[str, str | None]] | None = None) -> None:
        self.settings = settings
        self.state_dir = Path(settings.state_dir)
        self.reader = reader
        self.sync_loop = sync_loop
        self.conditions = sync_loop.conditions
        self.outbox = outbox
        self.capture = capture
        self.kept = kept
        self.notifier = notifier
        self.stop = stop
        self.clock = clock
        self.spool = Spool(self.state_dir).ensure()
        self.started_at = _now_iso(clock)
        self.phase = "starting"
        self.last_capture: CaptureDoc | None = None
        self.last_sync: SyncDoc | None = None
        self.stuck: str | None = None
        self.credentials = credentials or (lambda: {"source": "upload disabled"})
        self._capture_thread: threading.Thread | None = None
        self._sync_thread: threading.Thread | None = None

    # --- pieces the supervising loop reads ---------------------------------------------------

    def port_state(self) -> PortDoc:
        """The reader's state (port.LinkState) as status.json holds it."""
        state = self.reader.state
        last = state.last_byte_at
        age = None if last is None else round(max(0.0, time.monotonic() - last), 2)
        return PortDoc(path=self.settings.serial_port, connected=bool(state.connected),
                       last_byte_age_s=age, frames=state.frames_decoded,
                       reconnects=state.reconnects, error=state.last_error)

    def status_line(self, port: PortDoc, stats: QueueStats) -> str:
        """The one line `systemctl status` shows."""
        if self.stuck:
            return f"WEDGED: {self.stuck}"
        if self._capture_thread is not None:
            board = "capturing"
        elif port["connected"]:
            board = "board connected"
        else:
            board = f"waiting for board on {self.settings.serial_port}"
        cap = self.last_capture
        last_cap = f"{cap.get('at')} {cap.get('verdict') or 'failed'}" if cap else "none"
        queue = f"queue {stats.pending} pending/{stats.failed} failed"
        if stats.paused_until:
            queue += " (uploads paused)"
        last_up = "never"
        if stats.last_delivered_at:
            last_up = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stats.last_delivered_at))
        return f"{board}; {queue}; last capture {last_cap}; last upload {last_up}"

    def publish(self, *, ready: bool = False, notify: bool = True) -> None:
        """Rewrite status.json and send STATUS= (only when it changed), or READY=1 with it."""
        port = self.port_state()
        stats = self.outbox.stats()
        line = self.status_line(port, stats)
        clock = self.clock.state()
        doc = StatusDoc(version=__version__, pid=os.getpid(), phase=self.phase,
                        started_at=self.started_at, updated_at=time.time(), status=line,
                        port=port, last_capture=self.last_capture, last_sync=self.last_sync,
                        clock=ClockDoc(synced=clock.synced, reason=clock.reason),
                        held=held_count(self.state_dir), stuck=self.stuck,
                        credentials=self.credentials())
        try:
            write_status_file(self.state_dir, doc)
        except OSError as exc:  # a full disk must not stop captures or uploads
            condition = storage_condition(exc, self.state_dir)
            if condition is None:
                key = message = f"cannot write {self.state_dir}/status.json: {exc.strerror or exc}"
            else:  # the same line the sync loop logs for it: one line per condition
                key, message = f"storage {condition}", storage_message(condition, self.state_dir)
            self.conditions.update("status", {key: message})
        else:
            self.conditions.update("status", {})
        if ready:
            self.notifier.ready(line)
        elif notify:
            self.notifier.status(line)

    # --- threads -----------------------------------------------------------------------------

    def _sync_done(self, result: PassResult | None, errors: list[str]) -> None:
        self.last_sync = SyncDoc(at=_now_iso(self.clock),
                                 summary=None if result is None else result.summary(),
                                 paused=None if result is None else result.paused,
                                 errors=errors)

    def _capture_main(self, request: Request) -> None:
        try:
            result = self.capture(request)
        except AgentError as exc:
            result = {"ok": False, "exit_code": exc.exit_code, "error": str(exc)}
        except Exception as exc:
            log.exception("capture request %s failed", request.id)
            result = {"ok": False, "exit_code": 1, "error": f"{type(exc).__name__}: {exc}"}
        self.last_capture = CaptureDoc(at=_now_iso(self.clock), request=request.id,
                                       verdict=result.get("verdict"),
                                       record_id=result.get("record_id"),
                                       folder=result.get("folder"),
                                       disposition=result.get("disposition"),
                                       error=result.get("error"))
        try:
            self.spool.finish(request.id, result)
        except OSError as exc:
            log.error("cannot write the result of capture request %s: %s", request.id, exc)
        log.info("capture request %s: %s", request.id,
                 result.get("folder") or result.get("error"))
        release_memory()

    _spool_seen: tuple[int, int] | None = None  # spool/new's (mtime, inode) at the last look

    def _spool_changed(self) -> bool:
        """Whether spool/new may hold a request the last look did not find: one stat, where
        listing the folder every tick was a fifth of the idle service's CPU."""
        try:
            st = os.stat(self.spool.new)
        except OSError:
            return True  # claim() says what is wrong, or that there is nothing
        seen = (st.st_mtime_ns, st.st_ino)
        if seen == self._spool_seen and time.time() - st.st_mtime > SPOOL_SETTLE_S:
            return False
        self._spool_seen = seen  # taken before the listing: a later change is seen next tick
        return True

    def _serve_spool(self) -> None:
        if self._capture_thread is not None and not self._capture_thread.is_alive():
            self._capture_thread.join()
            self._capture_thread = None
            self._spool_seen = None  # requests that waited for this capture: look again
            self.publish()
        if self._capture_thread is not None or not self._spool_changed():
            return
        request = self.spool.claim()
        if request is None:
            return
        log.info("capture request %s claimed", request.id)
        self._capture_thread = threading.Thread(target=self._capture_main, args=(request,),
                                                name="capture", daemon=True)
        self._capture_thread.start()

    def _prune_results(self) -> None:
        cutoff = time.time() - RESULT_KEEP_S
        with contextlib.suppress(OSError):
            for path in self.spool.done.glob("*.json"):
                if path.stat().st_mtime < cutoff:
                    path.unlink()

    # --- the supervising loop ----------------------------------------------------------------

    def run(self) -> int:
        """Start reader and sync loop, announce READY, supervise until `stop`; exit code."""
        recovered = self.spool.recover(self.kept)
        if recovered:
            log.warning("answered %d capture request(s) interrupted by the last restart",
                        recovered)
        self.reader.start()
        self._sync_thread = threading.Thread(target=self.sync_loop.run, name="sync", daemon=True,
                                             kwargs={"on_pass": self._sync_done})
        self._sync_thread.start()
        try:
            deadline = time.monotonic() + READY_GRACE_S
            while not self.port_state()["connected"] and time.monotonic() < deadline:
                if self.stop.wait(0.05):
                    break
            self.phase = "running"
            port = self.port_state()
            if not port["connected"]:
                log.warning("serial port %s not open yet (%s); running without the board and "
                            "retrying", self.settings.serial_port, port["error"] or "absent")
            self.publish(ready=True)
            log.info("device-agent %s running (port %s, state %s)", __version__,
                     self.settings.serial_port, self.state_dir)
            return self._supervise()
        finally:
            self.phase = "stopping"
            self.stop.set()
            self.notifier.stopping()
            self._shutdown()

    def _supervise(self) -> int:
        next_publish = time.monotonic() + PUBLISH_EVERY_S
        next_prune = time.monotonic()
        connected = self.reader.state.connected
        while not self.stop.wait(TICK_S):
            if self._sync_thread is not None and not self._sync_thread.is_alive():
                log.error("the sync loop thread died; exiting so systemd restarts the service")
                return 1
            stuck = self.sync_loop.stuck()
            if stuck != self.stuck:
                if stuck:
                    log.error("%s; no longer feeding the watchdog, so systemd restarts the "
                              "service", stuck)
                self.stuck = stuck
                self.publish()
            if not stuck:
                self.notifier.watchdog()
            self._serve_spool()
            now = time.monotonic()
            was_connected, connected = connected, self.reader.state.connected
            if now >= next_publish or connected != was_connected:
                self.publish()
                next_publish = now + PUBLISH_EVERY_S
            if now >= next_prune:
                self._prune_results()
                next_prune = now + 600.0
        log.info("stopping")
        return 0

    def _shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.reader.stop()
        with contextlib.suppress(Exception):
            self.sync_loop.close()
        for thread in (self._capture_thread, self._sync_thread):
            if thread is not None:
                thread.join(timeout=5.0)
                if thread.is_alive():
                    log.warning("%s thread still busy at exit; its work is retried next start",
                                thread.name)
        self.phase = "stopped"
        with contextlib.suppress(Exception):
            self.publish(notify=False)  # nothing may follow STOPPING=1


@dataclass
class PackageCapture:
    """Serves one spool request: capture from the shared reader, build the package, decide."""

    settings: Settings
    reader: FrameSource
    outbox: Outbox
    clock: Clock

    def __call__(self, request: Request) -> CaptureResult:
        validate_patient(request.patient)
        if not self.reader.state.connected:
            return {"ok": False, "exit_code": 3,
                    "error": f"the board is not connected on {self.settings.serial_port} "
                             f"({self.reader.state.last_error or 'absent'}): check its USB "
                             "cable and power, then capture again"}
        outcome = capture_package(self.reader, self.settings, request.patient,
                                  outbox=self.outbox, clock=self.clock,
                                  seconds=request.seconds or self.settings.capture_seconds,
                                  withheld=request.no_upload,
                                  record_id=record_id_for(request.id))
        quality = outcome.record.quality
        result = {"folder": str(outcome.folder), "record_id": outcome.record.record_id,
                  "verdict": quality.verdict, "warnings": list(quality.reasons),
                  "queued": outcome.queued, "held": outcome.held is not None,
                  "disposition": outcome.disposition.decision}
        if outcome.rejected:
            return {**result, "ok": False, "exit_code": 1,
                    "error": rejection_message(self.settings, outcome)}
        return {**result, "ok": True, "exit_code": 0}

    def kept(self, record_id: str) -> CaptureResult | None:
        """The answer for a capture the last restart cut short, when its record is kept."""
        kept = find_capture(self.settings, self.outbox, record_id)
        if kept is None:
            return None
        log.warning("a capture cut short by the last restart was kept: record %s (%s), %s",
                    kept.record_id, kept.stamp or "not named yet", kept.state)
        return kept_answer(kept)

