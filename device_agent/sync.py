"""The sync loop: find what needs delivering, queue it, drain the queue, keep history small.

One pass, under the drain lock (STATE_DIR/outbox.lock: one drainer per unit):
0. what the legacy app delivered counts as delivered (legacy.Takeover: its upload_log.json
   when another writer changed it, the bucket once on the first start);
1. finders queue work, each on its own and each entry on its own:
   held captures the clock can now name (capture.release_held), complete package folders
   the outbox does not know (enqueue.reconcile_folders), reports dropped in REPORTS_DIR
   (reports.ReportsFinder), new users in USERS_FILE (users.SignupsFinder);
2. the drainer ships what is due (drain.Drainer);
3. housekeeping: the legacy upload_log.json view, retention pruning, compaction of old
   history, and removal of capture folders a crash left without a manifest.
A failure in any step is one line in the pass's errors and the next step still runs.
`run()` repeats every SYNC_INTERVAL_S on `stop.wait()`; signal handlers only set `stop`.
`stuck()` says whether the loop is wedged, for the systemd watchdog.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from device_agent.core.clock import Clock, held_dir
from device_agent.core.config import Settings
from device_agent.core.errors import AgentError, OutboxBusy
from device_agent.core.fsutil import FileLock, storage_condition, storage_message
from device_agent.ops.disk import prune, remove_incomplete
from device_agent.shipping.drain import Drainer
from device_agent.shipping.dropped_reports import ReportsFinder
from device_agent.shipping.enqueue import reconcile_folders
from device_agent.shipping.legacy import Takeover
from device_agent.shipping.outbox import Outbox, retention_cutoff
from device_agent.shipping.signups import SignupsFinder
from device_agent.shipping.upload_log import UPLOAD_LOG_NAME, UploadLog

log = logging.getLogger(__name__)

LOCK_NAME = "outbox.lock"
HOUSEKEEPING_EVERY_S = 600.0
STEP_BUDGET_S = 120.0  # a finder step taking longer than this is wedged (files are bounded)


def drain_lock(state_dir: Path) -> FileLock:
    """The exclusive lock a process holds while it drains STATE_DIR's outbox."""
    return FileLock(Path(state_dir) / LOCK_NAME)


@dataclass
class PassResult:
    """What one pass did (counts) and the one-line errors it met."""

    packages_queued: int = 0
    reports_queued: int = 0
    signups_queued: int = 0
    skipped: int = 0
    delivered: int = 0
    retrying: int = 0
    failed: int = 0
    pending: int = 0
    abandoned: int = 0
    paused: str | None = None
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"delivered {self.delivered}, retrying {self.retrying}, failed {self.failed}, "
                f"queued {self.packages_queued} packages/{self.reports_queued} reports/"
                f"{self.signups_queued} signups, {self.pending} pending")
        if self.skipped:
            text += f", {self.skipped} skipped"
        if self.paused:
            text += ", uploads paused"
        return text


class ConditionLog:
    """Each condition (a full disk, a failing step) is logged once when it starts and once
    when it ends, not once per pass: the sync loop and the status writer share one.

    An owner (a part of the service) says which conditions it meets now with `update`; a
    condition is active while any owner meets it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owners: dict[str, dict[str, str]] = {}  # owner -> {key: message}

    def _active(self) -> dict[str, str]:
        active: dict[str, str] = {}
        for current in self._owners.values():
            for key, message in current.items():
                active.setdefault(key, message)
        return active

    def update(self, owner: str, current: dict[str, str]) -> None:
        with self._lock:
            before = self._active()
            self._owners[owner] = dict(current)
            after = self._active()
        for key, message in after.items():
            if key not in before:
                log.error("%s", message)
        for key, message in before.items():
            if key not in after:
                log.info("no longer: %s", message)


class SyncLoop:
    """Finders, one drainer and housekeeping; `run_once()` for one pass, `run()` for the loop."""

    def __init__(self, settings: Settings, *, outbox: Outbox, drainer: Drainer,
                 stop: threading.Event, clock: Clock) -> None:
        self.settings = settings
        self.outbox = outbox
        self.drainer = drainer
        self.stop = stop
        self.clock = clock
        self.lock = drain_lock(settings.state_dir)
        self.records_root = Path(settings.state_dir) / "records"
        self.reports = ReportsFinder(settings.reports_dir, outbox,
                                     max_bytes=settings.report_max_bytes)
        self.signups = SignupsFinder(settings.users_file, Path(settings.state_dir) / "signups",
                                     outbox, max_bytes=settings.users_max_bytes)
        self.takeover = Takeover(settings, outbox, drainer.uploader)
        self._taken_over = False  # reports and signups wait for the first takeover look
        self._last_housekeeping = -HOUSEKEEPING_EVERY_S
        self._step: tuple[str, float] | None = None
        self.conditions = ConditionLog()  # a full disk is logged once, not once per pass

    def close(self) -> None:
        """End the drainer's executor (an upload in flight is retried on the next start)."""
        self.drainer.close()

    # --- health ---------------------------------------------------------------------------

    def stuck(self, now: float | None = None) -> str | None:
        """Why the loop is wedged (a step or an upload past every limit), or None."""
        now = time.monotonic() if now is None else now
        wedged = self.drainer.wedged(now)
        if wedged:
            return wedged
        step = self._step
        if step is not None and step[0] != "drain" and now - step[1] > STEP_BUDGET_S:
            return f"sync step '{step[0]}' has run {now - step[1]:.0f} s"
        return None

    # --- the loop -------------------------------------------------------------------------

    def run(self, *, on_pass: Callable[[PassResult | None, list[str]], None] | None = None
            ) -> None:
        """Pass after pass every SYNC_INTERVAL_S until `stop` is set.

        `on_pass(result, errors)` hears how each pass went (the service publishes it);
        result is None when the pass could not run at all.
        """
        interval = self.settings.sync_interval_s
        log.info("sync loop started (every %.0f s)", interval)
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                result = self.run_once(wait=True)
                log.debug("sync pass: %s", result.summary())
                if on_pass is not None:
                    on_pass(result, list(result.errors))
            except AgentError as exc:
                log.error("%s", exc)
                if on_pass is not None:
                    on_pass(None, [str(exc)])
            except Exception:  # the loop must survive anything one pass meets
                log.exception("sync pass failed; the next pass tries again")
            self.stop.wait(max(0.0, interval - (time.monotonic() - started)))
        log.info("sync loop stopped")

    def run_once(self, *, wait: bool = True) -> PassResult:
        """One pass under the drain lock; OutboxBusy if another process holds it and not wait."""
        if not self.lock.acquire(wait=wait, stop=self.stop):
            if self.stop.is_set():
                return PassResult()
            raise OutboxBusy(f"another device-agent process is draining the outbox "
                             f"({self.lock.path}); it syncs on its own, or use --wait")
        try:
            result = PassResult()
            steps: list[tuple[str, Callable[[PassResult], None]]] = [
                ("legacy", self._legacy),
                ("release held", self._release_held), ("reconcile", self._reconcile),
                ("scan reports", self._scan_reports), ("read users", self._scan_users),
                ("drain", self._drain), ("housekeeping", self._housekeeping),
            ]
            conditions: dict[str, str] = {}
            for name, step in steps:
                if self.stop.is_set():
                    break
                self._step = (name, time.monotonic())
                try:
                    step(result)
                except (OSError, sqlite3.Error, AgentError, ValueError) as exc:
                    key, message = self._describe(name, exc)
                    conditions.setdefault(key, message)
                    result.errors.append(message)
                finally:
                    self._step = None
            if not self.stop.is_set():  # an interrupted pass says nothing about what ended
                self.conditions.update("sync", conditions)
            result.pending = self.outbox.stats().pending
            return result
        finally:
            self.lock.release()

    def _describe(self, step: str, exc: BaseException) -> tuple[str, str]:
        """The condition's key (one for a full or read-only STATE_DIR, whichever step met
        it) and the step's one line."""
        condition = storage_condition(exc, self.settings.state_dir)
        if condition is None:
            message = f"{step}: {exc}"
            return message, message
        line = storage_message(condition, self.settings.state_dir)
        return f"storage {condition}", f"{step}: {line}; it is retried next pass"

    # --- the steps ------------------------------------------------------------------------

    def _release_held(self, result: PassResult) -> None:
        """Records captured before the clock was known get their names once it is.

        The capture path (numpy, the measurements, PDF and DICOM) is imported only when the
        held folder has something in it: a pass with nothing held never needs it.
        """
        try:
            if next(held_dir(self.settings.state_dir).iterdir(), None) is None:
                return
        except (FileNotFoundError, NotADirectoryError):
            return
        from device_agent.capture import release_held

        released = release_held(self.settings, outbox=self.outbox, clock=self.clock)
        result.packages_queued += sum(1 for o in released if o.queued)

    def _reconcile(self, result: PassResult) -> None:
        result.packages_queued += len(reconcile_folders(self.records_root, self.outbox))

    def _legacy(self, result: PassResult) -> None:
        """What the legacy app delivered (its log, the bucket once) counts as delivered."""
        self.takeover.run_once()
        self._taken_over = True

    def _scan_reports(self, result: PassResult) -> None:
        if not self._taken_over:
            return
        scan = self.reports.find()
        result.reports_queued += scan.queued
        result.skipped += scan.skipped
        result.errors.extend(scan.errors)

    def _scan_users(self, result: PassResult) -> None:
        if not self._taken_over:
            return
        found = self.signups.find()
        result.signups_queued += found.queued
        result.skipped += found.skipped
        result.errors.extend(found.errors)

    def _drain(self, result: PassResult) -> None:
        drained = self.drainer.drain()
        result.delivered += drained.delivered
        result.retrying += drained.retrying
        result.failed += drained.failed
        result.abandoned += drained.abandoned
        result.paused = drained.paused
        if drained.paused and drained.paused not in result.errors:
            result.errors.append(drained.paused)
        result.errors.extend(e for e in drained.errors if e != drained.paused)
        if drained.delivered or not (Path(self.settings.reports_dir) / UPLOAD_LOG_NAME
                                     ).exists():
            UploadLog(self.outbox.db, self.settings.reports_dir).write(
                bucket=self.settings.s3_bucket or "", region=self.settings.s3_region or "")

    def _housekeeping(self, result: PassResult) -> None:
        if time.monotonic() - self._last_housekeeping < HOUSEKEEPING_EVERY_S:
            return
        self._last_housekeeping = time.monotonic()
        cutoff = retention_cutoff(self.settings.retention_days, self.clock.time())
        prune(self.outbox, self.settings.state_dir, cutoff=cutoff)
        self.outbox.items.compact(before=cutoff)
        remove_incomplete(self.records_root, grace_s=self.settings.incomplete_grace_h * 3600,
                          now=self.clock.time())
