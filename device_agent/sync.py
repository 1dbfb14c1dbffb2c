"""The sync loop: find what needs delivering, put it in the outbox, drain the outbox to S3.

One pass: reconcile package folders with the outbox, scan REPORTS_DIR for new or modified
PDFs (by content hash), read USERS_FILE for new signups, drain due items (a package's three
files in parallel, its manifest last), write the legacy upload_log.json view, prune.
Only one process drains at a time (flock on STATE_DIR/outbox.lock). `run()` repeats every
SYNC_INTERVAL_S on `stop.wait()`; signal handlers (install_signal_handlers) only set `stop`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import queue
import random
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from device_agent.clock import Clock, clock_from_settings
from device_agent.errors import AgentError, OutboxBusy, UploadError
from device_agent.fsutil import atomic_write
from device_agent.outbox import Item, Outbox

log = logging.getLogger(__name__)

LOCK_NAME = "outbox.lock"
STABLE_AGE_S = 2.0  # a report untouched this long is taken as completely written
PRUNE_EVERY_S = 600.0
_REGISTRATION_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d")


class DrainLock:
    """An exclusive flock on STATE_DIR/outbox.lock: one drainer per unit."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, *, wait: bool = False, stop: threading.Event | None = None,
                poll_s: float = 0.1) -> bool:
        """Take the lock; with wait, poll until it is free or `stop` is set."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait or (stop is not None and stop.wait(poll_s)):
                    os.close(fd)
                    return False
                if stop is None:
                    time.sleep(poll_s)
                continue
            self._fd = fd
            return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@dataclass
class PassResult:
    """What one pass did (counts) and the one-line errors it met."""

    packages_queued: int = 0
    reports_queued: int = 0
    signups_queued: int = 0
    delivered: int = 0
    retrying: int = 0
    failed: int = 0
    pending: int = 0
    abandoned: int = 0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"delivered {self.delivered}, retrying {self.retrying}, failed {self.failed}, "
                f"queued {self.packages_queued} packages/{self.reports_queued} reports/"
                f"{self.signups_queued} signups, {self.pending} pending")


def build_uploader(settings: Any) -> Any:
    """The process's one S3 client wrapped in an Uploader (the CLI and service call this)."""
    from device_agent.uploader import Uploader

    return Uploader.from_settings(settings)


def install_signal_handlers(
    stop: threading.Event,
    signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP),
) -> dict[int, Any]:
    """The signals only set `stop` (main thread only); returns the previous handlers."""
    def handler(signum: int, frame: Any) -> None:
        stop.set()

    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous  # signals can only be handled on the main thread
    for sig in signals:
        previous[sig] = signal.signal(sig, handler)
    return previous


def restore_signal_handlers(previous: dict[int, Any]) -> None:
    """Put back what install_signal_handlers replaced."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def backoff_delay(attempts: int, *, base_s: float, cap_s: float,
                  rng: random.Random) -> float:
    """Exponential backoff with 'equal jitter': half fixed, half random, capped."""
    ceiling = min(cap_s, base_s * (2 ** max(0, attempts - 1)))
    return ceiling / 2 + rng.random() * ceiling / 2


class SyncLoop:
    """Scans, queues and drains; `run_once()` for one pass, `run()` until `stop` is set."""

    def __init__(self, settings: Any, *, outbox: Outbox, uploader: Any | None,
                 stop: threading.Event, clock: Clock | None = None,
                 rng: random.Random | None = None, backoff_base_s: float = 2.0,
                 workers: int = 3, load_package: Callable[[Path], Any] | None = None) -> None:
        self.settings = settings
        self.outbox = outbox
        self.uploader = uploader
        self.stop = stop
        self.clock = clock or clock_from_settings(settings)
        self.rng = rng or random.Random()
        self.backoff_base_s = backoff_base_s
        self.workers = workers
        self.load_package = load_package
        self.records_root = Path(settings.state_dir) / "records"
        self.signups_dir = Path(settings.state_dir) / "signups"
        self.lock = DrainLock(settings.state_dir)
        self._seen: dict[Path, tuple[int, int, int]] = {}
        self._hashed: dict[Path, tuple[tuple[int, int, int], str]] = {}
        self._last_prune = -PRUNE_EVERY_S
        self._users_error: str | None = None

    # --- the loop --------------------------------------------------------------------------

    def run(self, *, on_pass: Callable[[str | None, list[str]], None] | None = None) -> None:
        """Pass after pass every SYNC_INTERVAL_S until `stop` is set.

        `on_pass(summary, errors)` hears how each pass went (the service publishes it);
        summary is None when the pass could not run at all.
        """
        interval = self.settings.sync_interval_s
        log.info("sync loop started (every %.0f s)", interval)
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                result = self.run_once(wait=True)
                log.debug("sync pass: %s", result.summary())
                if on_pass is not None:
                    on_pass(result.summary(), list(result.errors))
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
                ("release held", self._release_held),
                ("reconcile", self._reconcile), ("scan reports", self._scan_reports),
                ("read users", self._scan_users), ("drain", self._drain),
                ("upload log", self._write_log), ("prune", self._prune),
            ]
            for name, step in steps:
                if self.stop.is_set() and name != "upload log":
                    continue
                try:
                    step(result)
                except (OSError, sqlite3.Error, AgentError) as exc:
                    message = self._describe(name, exc)
                    log.error("%s", message)
                    result.errors.append(message)
            stats = self.outbox.stats()
            result.pending = stats.pending
            return result
        finally:
            self.lock.release()

    def _describe(self, step: str, exc: BaseException) -> str:
        from device_agent.disk import is_disk_full

        if is_disk_full(exc):
            return (f"{step}: disk full under {self.settings.state_dir} ({exc}); nothing stored "
                    "was lost, it is retried next pass: free space on the SD card")
        return f"{step}: {exc}"

    # --- finding work ----------------------------------------------------------------------

    def _release_held(self, result: PassResult) -> None:
        """Records captured before the clock was known get their names once it is."""
        from device_agent.capture import held_dir, release_held

        if held_dir(self.settings).is_dir():
            result.packages_queued += len(release_held(self.settings, outbox=self.outbox,
                                                       clock=self.clock))

    def _reconcile(self, result: PassResult) -> None:
        folders, _ = self.outbox.reconcile(self.records_root, load_package=self.load_package)
        result.packages_queued += len(folders)

    def _stable(self, path: Path, st: os.stat_result, now: float) -> bool:
        """Unchanged since the last look, or untouched for STABLE_AGE_S (still being written?)."""
        sig = (st.st_size, st.st_mtime_ns, st.st_ino)
        previous = self._seen.get(path)
        self._seen[path] = sig
        return previous == sig or now - st.st_mtime >= STABLE_AGE_S

    def _hash(self, path: Path, st: os.stat_result) -> str:
        sig = (st.st_size, st.st_mtime_ns, st.st_ino)
        cached = self._hashed.get(path)
        if cached and cached[0] == sig:
            return cached[1]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        self._hashed[path] = (sig, digest)
        return digest

    def _scan_reports(self, result: PassResult) -> None:
        from device_agent.s3keys import report_key

        reports = Path(self.settings.reports_dir)
        if not reports.is_dir():
            return
        now = time.time()
        for pdf in sorted(reports.glob("*.pdf")):
            twin = pdf.with_suffix(".json")
            candidates = [(pdf, "ecg_report_pdf")]
            if twin.is_file():
                candidates.append((twin, "report_json"))
            for path, kind in candidates:
                try:
                    st = path.stat()
                    if not self._stable(path, st, now):
                        continue
                    sha = self._hash(path, st)
                except FileNotFoundError:
                    continue
                mtime = datetime.fromtimestamp(st.st_mtime).astimezone()
                key = report_key(path.name, mtime)
                if self.outbox.track_report(path, kind=kind, key=key, sha256=sha,
                                            size=st.st_size) is not None:
                    result.reports_queued += 1

    def _scan_users(self, result: PassResult) -> None:
        path = Path(self.settings.users_file)
        if not path.exists():
            return
        from device_agent.errors import UsersFileError
        from device_agent.fsutil import atomic_write
        from device_agent.s3keys import signup_key
        from device_agent.users import read_users, signup_document

        try:
            users = read_users(path)
        except UsersFileError as exc:
            message = str(exc)
            if message != self._users_error:  # once per distinct problem, not every pass
                log.error("%s", message)
            self._users_error = message
            result.errors.append(message)
            return
        self._users_error = None
        for user in users:
            username = str(user.get("username") or "").strip()
            if not username or self.outbox.user_stamp(username) is not None:
                continue
            registered = _parse_registration(user.get("registration_date"))
            if registered is None:
                if not self.clock.synced():
                    continue  # never stamp a signup from an unsynchronised clock
                registered = self.clock.now().replace(microsecond=0)
            key = signup_key(username, registered)
            doc = signup_document(user, registered, self.clock.now())
            self.signups_dir.mkdir(parents=True, exist_ok=True)
            local = self.signups_dir / key.rsplit("/", 1)[-1]
            atomic_write(local, doc)  # durable before its row
            if self.outbox.add_signup(username, registered.isoformat(), local, key=key,
                                      sha256=hashlib.sha256(doc).hexdigest(),
                                      size=len(doc)) is not None:
                result.signups_queued += 1

    # --- draining --------------------------------------------------------------------------

    def _drain(self, result: PassResult) -> None:
        if self.uploader is None:  # CLOUD_UPLOAD_ENABLED=false: everything stays queued
            return
        halt = threading.Event()  # set on the first retryable error: S3 is not answering
        tried: set[int] = set()
        for _ in range(2):  # data files first, then the manifests they unlocked
            items = [i for i in self.outbox.due(self.clock.time()) if i.id not in tried]
            if not items or halt.is_set() or self.stop.is_set():
                break
            tried.update(i.id for i in items)
            self._upload_all(items, halt, result)

    def _settle_manifest(self, item: Item) -> Item:
        """Make a manifest list where its package's files really landed, before it is sent.

        Two units of a fleet can stamp a capture in the same second; the later one's files
        then land under disambiguated keys (If-None-Match + SHA-256 compare), and a manifest
        still naming the plain keys would vouch for the other unit's files. The rewrite is
        a pure function of the delivered rows, so a crash anywhere in it is redone alike.
        """
        files = [s for s in self.outbox.package_items(item.package)
                 if s.kind != "manifest" and s.final_key]
        if all(s.final_key == s.key for s in files):
            return item
        landed = {s.filename: s.final_key for s in files}
        doc = json.loads(item.path.read_bytes())
        for entry in doc["files"]:
            entry["key"] = landed.get(entry["name"], entry["key"])
        body = json.dumps(doc, indent=2).encode("ascii")
        sha = hashlib.sha256(body).hexdigest()
        if sha == item.sha256:
            return item
        atomic_write(item.path, body)
        self.outbox.update_content(item.id, sha256=sha, size=len(body))
        log.warning("package %s shares its stamp with another in the bucket; its files were "
                    "kept under distinct keys and its manifest now lists them", item.package)
        return dataclasses.replace(item, sha256=sha, size=len(body))

    def _upload_all(self, items: list[Item], halt: threading.Event,
                    result: PassResult) -> None:
        items = [self._settle_manifest(i) if i.kind == "manifest" and i.package else i
                 for i in items]
        todo: queue.Queue[Item] = queue.Queue()
        for item in items:
            todo.put(item)
        done: queue.Queue[tuple[Item, Any]] = queue.Queue()

        def worker() -> None:
            while not (halt.is_set() or self.stop.is_set()):
                try:
                    item = todo.get_nowait()
                except queue.Empty:
                    return
                done.put((item, self._upload(item)))

        threads = [threading.Thread(target=worker, name=f"sync-upload-{n}", daemon=True)
                   for n in range(min(self.workers, len(items)))]
        for t in threads:
            t.start()
        # daemon workers: on stop an in-flight put is abandoned (S3 puts are atomic and the
        # If-None-Match rule makes the next attempt safe) so the loop stops within a second
        while any(t.is_alive() for t in threads) or not done.empty():
            try:
                item, outcome = done.get(timeout=0.1)
            except queue.Empty:
                if self.stop.is_set():
                    grace = time.monotonic() + 0.3
                    for t in threads:
                        t.join(timeout=max(0.0, grace - time.monotonic()))
                    if any(t.is_alive() for t in threads):
                        result.abandoned += 1
                        log.warning("stopping with an upload in flight; it is retried on start")
                        break
                continue
            self._record(item, outcome, halt, result)
        while not done.empty():
            self._record(*done.get_nowait(), halt, result)

    def _upload(self, item: Item) -> Any:
        """Put one item; returns a PutResult, an UploadError, or None (not attempted)."""
        from device_agent.s3keys import object_metadata

        try:
            body = item.path.read_bytes()
        except FileNotFoundError:
            return UploadError(f"local file {item.path} for s3 key {item.key} is gone; it "
                               "cannot be delivered", retryable=False, code="LocalFileMissing")
        except OSError as exc:
            return UploadError(f"cannot read {item.path}: {exc}", retryable=True,
                               code="LocalReadError")
        sha = hashlib.sha256(body).hexdigest()
        if sha != item.sha256:
            if item.source == "report":
                return None  # rewritten since queued: the next scan updates the row
            return UploadError(
                f"{item.path} no longer matches the SHA-256 recorded when it was queued "
                "(changed or corrupted on disk); inspect it, then `queue retry` re-reads it",
                retryable=False, code="LocalFileChanged")
        metadata = object_metadata(item.kind, item.filename, uploaded_at=self.clock.now(),
                                   record_id=item.record_id, device_serial=item.device_serial,
                                   sha256=sha)
        try:
            if item.if_match:
                return self.uploader.replace(item.key, body, sha256=sha, metadata=metadata,
                                             content_type=item.content_type,
                                             if_match=item.if_match)
            return self.uploader.put_new(item.key, body, sha256=sha, metadata=metadata,
                                         content_type=item.content_type)
        except UploadError as exc:
            return exc
        except Exception as exc:
            from device_agent.uploader import classify_error

            return classify_error(exc, bucket=getattr(self.uploader, "bucket", "?"),
                                  key=item.key)

    def _record(self, item: Item, outcome: Any, halt: threading.Event,
                result: PassResult) -> None:
        if outcome is None:
            self.outbox.defer(item.id, self.clock.time() + STABLE_AGE_S)
            return
        if isinstance(outcome, UploadError):
            if outcome.retryable:
                halt.set()
                delay = backoff_delay(item.attempts + 1, base_s=self.backoff_base_s,
                                      cap_s=self.settings.retry_max_backoff_s, rng=self.rng)
                self.outbox.mark_failed(item.id, retryable=True, error=str(outcome),
                                        next_at=self.clock.time() + delay)
                result.retrying += 1
                log.warning("upload of %s failed, retry in %.0f s: %s", item.key, delay,
                            outcome)
            else:
                self.outbox.mark_failed(item.id, retryable=False, error=str(outcome))
                result.failed += 1
                log.error("upload of %s failed permanently (`device-agent queue retry %d` "
                          "after fixing it): %s", item.key, item.id, outcome)
            return
        self.outbox.mark_delivered(item.id, etag=outcome.etag, final_key=outcome.key,
                                   outcome=outcome.outcome)
        result.delivered += 1
        log.info("delivered %s (%s)", outcome.key, outcome.outcome)

    # --- after the drain -------------------------------------------------------------------

    def _write_log(self, result: PassResult) -> None:
        log_path = Path(self.settings.reports_dir) / "upload_log.json"
        if result.delivered or not log_path.exists():
            self.outbox.write_upload_log(self.settings.reports_dir)

    def _prune(self, result: PassResult) -> None:
        from device_agent.disk import prune

        if time.monotonic() - self._last_prune < PRUNE_EVERY_S:
            return
        self._last_prune = time.monotonic()
        prune(self.outbox, self.settings)


def _parse_registration(value: Any) -> datetime | None:
    """A users.json registration date (legacy 'YYYY-MM-DD HH:MM:SS' or ISO), local time."""
    if not value or not isinstance(value, str):
        return None
    text = value.strip()
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        when = None
        for fmt in _REGISTRATION_FORMATS:
            with contextlib.suppress(ValueError):
                when = datetime.strptime(text, fmt)
                break
    if when is None or when.year < 2000:
        return None
    return when if when.tzinfo else when.astimezone()


def cmd_sync(settings: Any, args: Any) -> int:
    """`device-agent sync [--once] [--wait]`: one pass; exit 3 if S3 could not be reached."""
    from device_agent.cli import echo

    stop = threading.Event()
    uploader = build_uploader(settings) if settings.cloud_upload_enabled else None
    previous = install_signal_handlers(stop)
    try:
        with Outbox.open(settings) as outbox:
            loop = SyncLoop(settings, outbox=outbox, uploader=uploader, stop=stop)
            result = loop.run_once(wait=bool(getattr(args, "wait", False)))
    finally:
        restore_signal_handlers(previous)
    # each error was logged once, where it happened; the summary counts what was done
    echo(f"sync: {result.summary()}" + (f", {len(result.errors)} error(s) above"
                                         if result.errors else ""))
    if result.failed:
        return 1
    return 3 if result.retrying else 0

