"""The drainer: ships due outbox items to S3 through one executor it owns for its life.

One `drain()` sends what is due: a package's data files in parallel, its manifest once they
are delivered (settled first, so it lists where they landed). Each item's outcome is
recorded against that item alone, and one item's trouble never stops the others:
- a put S3 proved is committed as delivered (only then; see uploader.py for the proof);
- an error about the object itself (its file is gone, or changed) fails that item;
- an error about the endpoint, credentials or bucket (a 403, an expired token, a captive
  portal, a timeout) pauses the whole queue with backoff and counts against no item.
When the outbox is newer than the files it holds (state was lost, a reflashed card), the
bucket is LISTed once per day folder and objects it already holds are not sent again.

`wedged()` tells the service when an upload has run past everything its deadlines allow, so
the systemd watchdog stops being fed and systemd restarts the process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from dataclasses import dataclass, field
from typing import Any

from device_agent.core import s3keys
from device_agent.core.clock import Clock
from device_agent.core.errors import UploadError
from device_agent.core.fsutil import FileTooLarge, NotRegularFile, atomic_write, read_regular
from device_agent.shipping.enqueue import settle_manifest
from device_agent.shipping.outbox import Item
from device_agent.shipping.protocols import Queue, Uploader
from device_agent.shipping.uploader import ALREADY_DELIVERED, PutResult, classify_error

log = logging.getLogger(__name__)

STABLE_AGE_S = 2.0  # a report rewritten while queued is looked at again after this
OWN_FILE_MAX_BYTES = 1 << 30  # the agent's own files are small; this only bounds a mistake
_WEDGE_SLACK_S = 30.0


class DaemonExecutor(Executor):
    """A fixed pool of daemon worker threads: an upload stuck at shutdown never holds up
    the process's exit (S3 puts are atomic and If-None-Match makes the retry safe)."""

    def __init__(self, workers: int, *, name: str = "upload") -> None:
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue())
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{n}", daemon=True)
                         for n in range(workers)]
        self._closed = False
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if self._closed:
            raise RuntimeError("executor is shut down")
        future: Future[Any] = Future()
        self._queue.put((future, lambda: fn(*args, **kwargs)))
        return future

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            future, call = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as exc:
                future.set_exception(exc)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True
        if cancel_futures:
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for t in self._threads:
                t.join()


class SynchronousExecutor(Executor):
    """Runs each job at submit, in the caller's thread (tests)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


def backoff_delay(attempts: int, *, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Exponential backoff with 'equal jitter': half fixed, half random, capped."""
    ceiling = min(cap_s, base_s * 2.0 ** max(0, attempts - 1))
    return ceiling / 2 + rng.random() * ceiling / 2


@dataclass
class DrainResult:
    """What one drain did, and the one-line errors it met."""

    delivered: int = 0
    retrying: int = 0
    failed: int = 0
    abandoned: int = 0
    paused: str | None = None
    errors: list[str] = field(default_factory=list)


Outcome = PutResult | UploadError | None


@dataclass
class _Flight:
    item: Item
    started: float
    limit_s: float


class Drainer:
    """Ships the outbox; `drain()` is one pass, `close()` ends its executor."""

    def __init__(self, outbox: Queue, uploader: Uploader | None, *, clock: Clock,
                 stop: threading.Event, backoff_base_s: float = 2.0,
                 backoff_cap_s: float = 900.0, workers: int = 3,
                 executor: Executor | None = None, rng: random.Random | None = None,
                 checkpoint: Callable[[str], None] = lambda name: None,
                 report_max_bytes: int = 64 << 20) -> None:
        self.queue = outbox
        self.uploader = uploader
        self.clock = clock
        self.stop = stop
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.rng = rng or random.Random()
        self.checkpoint = checkpoint
        self.report_max_bytes = report_max_bytes
        self._executor = executor or DaemonExecutor(workers)
        self._owns_executor = executor is None
        self._flights: dict[Future[Any], _Flight] = {}
        self._flights_lock = threading.Lock()
        self._pauses = 0
        self._listings: dict[str, dict[str, tuple[str, int]] | None] = {}

    def close(self) -> None:
        """End the executor; an upload still in flight is abandoned (retried next start)."""
        if self._owns_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # --- health ---------------------------------------------------------------------------

    def wedged(self, now: float | None = None) -> str | None:
        """Why an upload in flight has run past every deadline it has, or None."""
        now = time.monotonic() if now is None else now
        with self._flights_lock:
            flights = list(self._flights.values())
        for f in flights:
            if now - f.started > f.limit_s:
                return (f"the upload of {s3keys.display_name(f.item.filename)} has run "
                        f"{now - f.started:.0f} s, past its {f.limit_s:.0f} s limit")
        return None

    # --- one pass -------------------------------------------------------------------------

    def drain(self) -> DrainResult:
        """Send what is due (data files first, then the manifests they unlocked)."""
        result = DrainResult()
        self._listings = {}
        if self.uploader is None:  # CLOUD_UPLOAD_ENABLED=false: everything stays queued
            return result
        paused = self.queue.pause.current(self.clock.time())
        if paused is not None:
            result.paused = paused[1]
            return result
        tried: set[int] = set()
        for _ in range(2):
            items = [i for i in self.queue.items.due(self.clock.time()) if i.id not in tried]
            if not items or result.paused or self.stop.is_set():
                break
            tried.update(i.id for i in items)
            self._ship_all(items, result)
        return result

    def _ship_all(self, items: list[Item], result: DrainResult) -> None:
        pending: dict[Future[Any], Item] = {}
        for queued in items:
            try:
                item = self._prepare(queued, result)
            except (OSError, ValueError) as exc:
                err = UploadError(f"cannot prepare {s3keys.display_name(queued.filename)}: "
                                  f"{exc}", retryable=True, code="LocalReadError")
                self._record(queued, err, result)
                continue
            if item is None:
                continue
            future = self._executor.submit(self._ship, item)
            with self._flights_lock:
                self._flights[future] = _Flight(item, time.monotonic(),
                                                self._limit(item))
            pending[future] = item
        while pending:
            if self.stop.is_set():
                grace = time.monotonic() + 0.3
                while pending and time.monotonic() < grace:
                    self._collect(pending, result, timeout=0.05)
                for future in pending:
                    if not future.cancel():
                        result.abandoned += 1
                if result.abandoned:
                    log.warning("stopping with %d upload(s) in flight; retried on start",
                                result.abandoned)
                with self._flights_lock:
                    for future in pending:
                        self._flights.pop(future, None)
                return
            self._collect(pending, result, timeout=0.1)
            if result.paused:
                for future in [f for f in pending if f.cancel()]:
                    with self._flights_lock:
                        self._flights.pop(future, None)
                    del pending[future]

    def _collect(self, pending: dict[Future[Any], Item], result: DrainResult,
                 timeout: float) -> None:
        done, _ = wait(list(pending), timeout=timeout, return_when=FIRST_COMPLETED)
        before = result.delivered
        with self.queue.items.batch():  # one commit (one fsync) for the answers this wait got
            for future in done:
                self._settle(future, pending, result)
        for _ in range(result.delivered - before):
            self.checkpoint("drain.committed")

    def _settle(self, future: Future[Any], pending: dict[Future[Any], Item],
                result: DrainResult) -> None:
        item = pending.pop(future)
        with self._flights_lock:
            self._flights.pop(future, None)
        if future.cancelled():
            return
        try:
            outcome: Outcome = future.result()
        except Exception as exc:  # a bug in one item's path must not stop the drain
            log.exception("upload of item %d failed unexpectedly", item.id)
            outcome = UploadError(f"unexpected {type(exc).__name__}: {exc}",
                                  retryable=True, code=type(exc).__name__)
        self._record(item, outcome, result)

    def _limit(self, item: Item) -> float:
        assert self.uploader is not None
        return float(self.uploader.max_duration_s(item.size)) + _WEDGE_SLACK_S

    # --- before the put --------------------------------------------------------------------

    def _prepare(self, item: Item, result: DrainResult) -> Item | None:
        """Settle a manifest, or skip an item the bucket already holds; None: nothing to send."""
        if item.kind == "manifest" and item.package:
            body = settle_manifest(item, self.queue.items.of_package(item.package))
            if body is not None:
                atomic_write(item.path, body)
                sha = hashlib.sha256(body).hexdigest()
                self.queue.items.update_content(item.id, sha256=sha, size=len(body))
                log.warning("package %s shares its stamp with another in the bucket; its files "
                            "were kept under distinct keys and its manifest now lists them",
                            item.package)
                item = dataclasses.replace(item, sha256=sha, size=len(body))
        if self._already_there(item):
            result.delivered += 1
            return None
        return item

    def _already_there(self, item: Item) -> bool:
        """After lost state: does one LIST of the item's day folder show it is delivered?"""
        created = self.queue.created_at()
        if created <= 0 or item.attempts or item.if_match or item.prior_sha256:
            return False
        try:
            if item.path.stat().st_mtime >= created:
                return False
        except OSError:
            return False
        assert self.uploader is not None
        prefix = item.key.rsplit("/", 1)[0] + "/"
        if item.package:  # a package folder: list its day, where the stamp folders are
            prefix = prefix.rstrip("/").rsplit("/", 1)[0] + "/"
        if prefix not in self._listings:
            try:
                self._listings[prefix] = self.uploader.list_prefix(prefix)
            except UploadError as exc:
                log.info("cannot LIST %s to skip what the bucket holds (%s); sending instead",
                         prefix, exc.code)
                self._listings[prefix] = None
        listing = self._listings[prefix]
        if not listing or item.key not in listing:
            return False
        etag, size = listing[item.key]
        md5 = hashlib.md5(item.path.read_bytes(), usedforsecurity=False).hexdigest()
        if size != item.size or etag.strip('"') != md5 or not self._sha_matches(item):
            return False
        self.queue.items.mark_delivered(item.id, etag=etag, final_key=item.key,
                                        outcome=ALREADY_DELIVERED)
        log.info("%s already in the bucket (LIST after lost state); not sent again",
                 s3keys.display_name(item.filename))
        return True

    def _sha_matches(self, item: Item) -> bool:
        return hashlib.sha256(item.path.read_bytes()).hexdigest() == item.sha256

    # --- the put (on an executor thread) ----------------------------------------------------

    def _ship(self, item: Item) -> Outcome:
        """Put one item; a PutResult, an UploadError, or None (rewritten: look again later)."""
        assert self.uploader is not None
        limit = self.report_max_bytes if item.source == "report" else OWN_FILE_MAX_BYTES
        name = s3keys.display_name(item.filename)
        try:
            body = read_regular(item.path, max_bytes=limit)
        except FileNotFoundError:
            return UploadError(f"local file for {name} is gone; it cannot be delivered",
                               retryable=False, code="LocalFileMissing")
        except (NotRegularFile, FileTooLarge) as exc:
            return UploadError(f"local file for {name} is {exc.strerror}; not sent",
                               retryable=False, code="LocalFileChanged")
        except OSError as exc:
            return UploadError(f"cannot read the local file for {name}: {exc.strerror}",
                               retryable=True, code="LocalReadError")
        sha = hashlib.sha256(body).hexdigest()
        if sha != item.sha256:
            if item.source == "report":
                return None  # rewritten since queued: the next scan updates the row
            return UploadError(
                f"the local file for {name} no longer matches the SHA-256 recorded when it was "
                "queued (changed or corrupted on disk); inspect it, then `queue retry`",
                retryable=False, code="LocalFileChanged")
        metadata = s3keys.object_metadata(item.kind, item.filename, uploaded_at=self.clock.now(),
                                          record_id=item.record_id,
                                          device_serial=item.device_serial, sha256=sha)
        self.checkpoint("drain.before_put")
        try:
            if item.if_match:
                return self.uploader.replace(item.key, body, sha256=sha, metadata=metadata,
                                             content_type=item.content_type,
                                             if_match=item.if_match, ours=item.prior_sha256)
            return self.uploader.put_new(item.key, body, sha256=sha, metadata=metadata,
                                         content_type=item.content_type,
                                         ours=item.prior_sha256)
        except UploadError as exc:
            return exc
        except Exception as exc:
            return classify_error(exc, bucket=self.uploader.bucket, key=item.key)

    # --- after the put ---------------------------------------------------------------------

    def _record(self, item: Item, outcome: Outcome, result: DrainResult) -> None:
        name = s3keys.display_name(item.filename)
        now = self.clock.time()
        if outcome is None:
            self.queue.items.defer(item.id, now + STABLE_AGE_S)
            return
        if isinstance(outcome, PutResult):
            self.checkpoint("drain.put_answered")
            self.queue.items.mark_delivered(item.id, etag=outcome.etag, final_key=outcome.key,
                                            outcome=outcome.outcome)
            result.delivered += 1  # committed with the others of its wait: _collect
            if self._pauses and not result.paused:  # the endpoint answers again
                self._pauses = 0
                self.queue.pause.lift()
            log.info("delivered %s (%s)", s3keys.display_name(outcome.key.rsplit("/", 1)[-1]),
                     outcome.outcome)
            return
        message = str(outcome)
        result.errors.append(message)
        if outcome.scope == "queue":
            if not result.paused:
                self._pauses += 1
                delay = backoff_delay(self._pauses, base_s=self.backoff_base_s,
                                      cap_s=self.backoff_cap_s, rng=self.rng)
                self.queue.pause.hold(now + delay, message)
                result.paused = message
                log.warning("uploads paused for %.0f s: %s", delay, message)
            self.queue.items.note_attempt(item.id, message)
            result.retrying += 1
        elif outcome.retryable:
            delay = backoff_delay(item.attempts + 1, base_s=self.backoff_base_s,
                                  cap_s=self.backoff_cap_s, rng=self.rng)
            self.queue.items.mark_failed(item.id, retryable=True, error=message,
                                         next_at=now + delay)
            result.retrying += 1
            log.warning("upload of %s failed, retry in %.0f s: %s", name, delay, message)
        else:
            self.queue.items.mark_failed(item.id, retryable=False, error=message)
            result.failed += 1
            log.error("upload of %s failed for good (`device-agent queue retry %d` after "
                      "fixing it): %s", name, item.id, message)
