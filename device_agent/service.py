"""`device-agent run`: the service, the process edge that builds and wires everything once.

Threads: the serial reader (port.py, its own thread, reconnects forever), the sync loop
(sync.py, every SYNC_INTERVAL_S), one capture at a time when a request arrives through the
spool, and this supervising loop on the main thread, which pings the systemd watchdog,
publishes STATUS= and STATE_DIR/status.json, and claims capture requests. SIGTERM/SIGINT only
set `stop`; every wait is `stop.wait()`, so the service exits within a second.

A board that is absent at boot does not hold the service back: READY=1 goes out once the
outbox is open and the port has had a short grace period to open, with STATUS "waiting for
board on PORT" when it has not. Uploads of earlier records carry on and the reader keeps
retrying; an unplugged adapter never kills the service. Capture requests made while the board
is absent are answered with a clear error instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from device_agent import __version__
from device_agent.errors import AgentError
from device_agent.notify import Notifier
from device_agent.spool import Request, ServiceLock, Spool, running_pid
from device_agent.status import outbox_summary, read_status_file, write_status_file

log = logging.getLogger(__name__)

TICK_S = 0.2            # supervising loop period: stop latency and spool pickup
PUBLISH_EVERY_S = 2.0   # status.json and STATUS= refresh
READY_GRACE_S = 3.0     # how long READY waits for the port before saying "waiting for board"
RESULT_KEEP_S = 3600.0  # unread capture results are deleted after this
HANDOFF_EXTRA_S = 30.0  # beyond the capture length: wait for a silent board, build the package

CaptureFn = Callable[[Request], dict[str, Any]]


def release_memory() -> None:
    """Hand the heap a capture used (frames, JSON text, PDF paths) back to the OS.

    A capture allocates a few MB in bursts; glibc keeps freed arenas mapped, and on a
    small board the service's resident size is what counts (README, performance).
    """
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


class Service:
    """The running agent: supervises reader, sync loop and captures; `run()` until `stop`."""

    def __init__(self, settings: Any, *, reader: Any, sync_loop: Any, capture: CaptureFn,
                 notifier: Notifier, stop: threading.Event, clock: Any = None) -> None:
        self.settings = settings
        self.state_dir = Path(settings.state_dir)
        self.reader = reader
        self.sync_loop = sync_loop
        self.capture = capture
        self.notifier = notifier
        self.stop = stop
        self.clock = clock
        self.spool = Spool(self.state_dir).ensure()
        self.started_at = _now_iso()
        self.phase = "starting"
        previous = read_status_file(self.state_dir) or {}
        self.last_capture: dict[str, Any] | None = previous.get("last_capture")
        self.last_sync: dict[str, Any] | None = None
        self._capture_thread: threading.Thread | None = None
        self._sync_thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # --- pieces the supervising loop reads ---------------------------------------------------

    def port_state(self) -> dict[str, Any]:
        """The reader's state (port.LinkState) as status.json holds it."""
        state = self.reader.state
        last = state.last_byte_at
        age = None if last is None else round(max(0.0, time.monotonic() - last), 2)
        return {"path": self.settings.serial_port, "connected": bool(state.connected),
                "last_byte_age_s": age, "frames": state.frames_decoded,
                "reconnects": state.reconnects, "error": state.last_error}

    def status_line(self, port: dict[str, Any], outbox: dict[str, Any]) -> str:
        """The one line `systemctl status` shows."""
        if self._capture_thread is not None:
            board = "capturing"
        elif port["connected"]:
            board = "board connected"
        else:
            board = f"waiting for board on {self.settings.serial_port}"
        cap = self.last_capture or {}
        last_cap = f"{cap.get('at')} {cap.get('verdict') or 'failed'}" if cap else "none"
        return (f"{board}; queue {outbox['pending']} pending/{outbox['failed']} failed; "
                f"last capture {last_cap}; last upload {outbox['last_upload_at'] or 'never'}")

    def publish(self, *, ready: bool = False, notify: bool = True) -> None:
        """Rewrite status.json and send STATUS= (only when it changed), or READY=1 with it."""
        port = self.port_state()
        outbox = outbox_summary(self.state_dir)
        line = self.status_line(port, outbox)
        doc = {"version": __version__, "pid": os.getpid(), "phase": self.phase,
               "started_at": self.started_at, "updated_at": time.time(), "status": line,
               "port": port, "last_capture": self.last_capture, "last_sync": self.last_sync}
        try:
            write_status_file(self.state_dir, doc)
        except OSError as exc:  # a full disk must not stop captures or uploads
            log.warning("cannot write %s/status.json: %s", self.state_dir, exc)
        if ready:
            self.notifier.ready(line)
        elif notify:
            self.notifier.status(line)

    # --- threads -----------------------------------------------------------------------------

    def _sync_done(self, summary: str | None, errors: list[str]) -> None:
        self.last_sync = {"at": _now_iso(), "summary": summary, "errors": errors}

    def _capture_main(self, request: Request) -> None:
        try:
            result = self.capture(request)
        except AgentError as exc:
            result = {"ok": False, "exit_code": exc.exit_code, "error": str(exc)}
        except Exception as exc:
            log.exception("capture request %s failed", request.id)
            result = {"ok": False, "exit_code": 1, "error": f"{type(exc).__name__}: {exc}"}
        self.last_capture = {"at": _now_iso(), "request": request.id,
                             **{k: result.get(k) for k in ("verdict", "record_id", "folder",
                                                           "error")}}
        try:
            self.spool.finish(request.id, result)
        except OSError as exc:
            log.error("cannot write the result of capture request %s: %s", request.id, exc)
        log.info("capture request %s: %s", request.id,
                 result.get("folder") or result.get("error"))
        release_memory()

    def _serve_spool(self) -> None:
        if self._capture_thread is not None and not self._capture_thread.is_alive():
            self._capture_thread.join()
            self._capture_thread = None
            self.publish()
        if self._capture_thread is not None:
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
        recovered = self.spool.recover()
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
        while not self.stop.wait(TICK_S):
            if self._sync_thread is not None and not self._sync_thread.is_alive():
                log.error("the sync loop thread died; exiting so systemd restarts the service")
                return 1
            self.notifier.watchdog()
            self._serve_spool()
            now = time.monotonic()
            if now >= next_publish:
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
    """Serves one spool request: capture from the shared reader, build the package, queue it."""

    settings: Any
    reader: Any
    outbox: Any
    clock: Any = None

    def __call__(self, request: Request) -> dict[str, Any]:
        from device_agent.capture import capture_package, rejection_message
        from device_agent.package import validate_patient

        validate_patient(request.patient)
        if not self.reader.state.connected:
            return {"ok": False, "exit_code": 3,
                    "error": f"the board is not connected on {self.settings.serial_port} "
                             f"({self.reader.state.last_error or 'absent'}): check its USB "
                             "cable and power, then capture again"}
        outcome = capture_package(self.reader, self.settings, request.patient,
                                  outbox=self.outbox, clock=self.clock,
                                  seconds=request.seconds or self.settings.capture_seconds,
                                  no_upload=request.no_upload)
        quality = outcome.record.quality
        result = {"folder": str(outcome.folder), "record_id": outcome.record.record_id,
                  "verdict": quality.verdict, "warnings": list(quality.reasons),
                  "queued": outcome.queued, "held": outcome.held is not None}
        if outcome.rejected:
            return {**result, "ok": False, "exit_code": 1,
                    "error": rejection_message(self.settings, outcome)}
        return {**result, "ok": True, "exit_code": 0}


def capture_via_service(settings: Any, args: Any, patient: dict[str, Any] | None) -> int | None:
    """Hand `capture` to a running service and wait; None when no service runs (capture here)."""
    from device_agent.capture import HELD_WARNING
    from device_agent.cli import echo

    pid = running_pid(Path(settings.state_dir))
    if pid is None:
        return None
    if getattr(args, "out", None):
        echo("warning: --out is ignored: the running service writes under STATE_DIR/records "
             "(use --direct with the service stopped)", err=True)
    timeout_s = settings.capture_seconds + HANDOFF_EXTRA_S
    log.info("the service (pid %s) owns the port; handing the capture to it", pid)
    spool = Spool(Path(settings.state_dir))
    request = spool.submit(seconds=settings.capture_seconds, patient=patient,
                           no_upload=bool(getattr(args, "no_upload", False)),
                           timeout_s=timeout_s)
    result = spool.wait(request, timeout_s=timeout_s)
    for warning in result.get("warnings") or ():
        if result.get("ok"):
            echo(f"warning: {warning}", err=True)
    if result.get("held"):
        echo(f"warning: {HELD_WARNING}", err=True)
    if result.get("queued"):
        echo("queued for upload by the service", err=True)
    if result.get("folder"):
        echo(result["folder"])
    if result.get("ok"):
        return 0
    error = AgentError(result.get("error") or "the service could not capture")
    error.exit_code = int(result.get("exit_code") or 1)
    raise error


def cmd_run(settings: Any, args: Any) -> int:
    """`device-agent run`: the service (under systemd, Type=notify); this is the process edge."""
    from device_agent.clock import clock_from_settings
    from device_agent.outbox import Outbox
    from device_agent.port import SerialReader
    from device_agent.sync import (
        SyncLoop,
        build_uploader,
        install_signal_handlers,
        restore_signal_handlers,
    )

    stop = threading.Event()
    notifier = Notifier.from_environ(os.environ)  # the process edge reads the environment
    clock = clock_from_settings(settings)
    with ServiceLock(settings.state_dir), Outbox.open(settings) as outbox:
        # SIGHUP is left alone: under systemd it is not a request to stop
        previous = install_signal_handlers(stop, (signal.SIGTERM, signal.SIGINT))
        try:
            uploader = build_uploader(settings) if settings.cloud_upload_enabled else None
            reader = SerialReader.from_settings(settings)
            loop = SyncLoop(settings, outbox=outbox, uploader=uploader, stop=stop, clock=clock)
            capture = PackageCapture(settings, reader, outbox, clock)
            service = Service(settings, reader=reader, sync_loop=loop, capture=capture,
                              notifier=notifier, stop=stop, clock=clock)
            return service.run()
        finally:
            restore_signal_handlers(previous)
            notifier.close()
