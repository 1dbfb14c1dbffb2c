"""`device-agent capture`: one record from the board, by the running service or directly."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from device_agent.commands import echo
from device_agent.core.config import Settings
from device_agent.core.errors import AgentError, CaptureRejected
from device_agent.documents.patient import read_patient, validate_patient
from device_agent.ops.spool import Spool, running_pid

log = logging.getLogger(__name__)

HANDOFF_EXTRA_S = 30.0  # beyond the capture length: wait for a silent board, build the package


class ProgressBar:
    """Capture progress on stderr, redrawn only when the percentage changes."""

    def __init__(self, width: int = 30) -> None:
        self.width = width
        self._last = -1

    def __call__(self, done: int, total: int) -> None:
        percent = 100 * done // max(total, 1)
        if percent == self._last:
            return
        self._last = percent
        filled = self.width * done // max(total, 1)
        sys.stderr.write(f"\rcapturing [{'#' * filled}{'.' * (self.width - filled)}] "
                         f"{percent:3d}%")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def run(settings: Settings, args: argparse.Namespace) -> int:
    patient = read_patient(args.patient)
    validate_patient(patient)  # refuse a bad patient file before occupying the board
    if not args.direct:
        handed = via_service(settings, args, patient)  # None: no service runs
        if handed is not None:
            return handed
    return direct(settings, args, patient)


def direct(settings: Settings, args: argparse.Namespace,
           patient: dict[str, Any] | None) -> int:
    """Open the port here and capture (no service runs, or --direct)."""
    from device_agent.capture import HELD_WARNING, capture_package, rejection_message
    from device_agent.core.clock import clock_from_settings
    from device_agent.link.port import SerialReader
    from device_agent.shipping.outbox import Outbox

    progress = ProgressBar() if sys.stdout.isatty() else None
    clock = clock_from_settings(settings)
    with Outbox.open(settings) as outbox:
        reader = SerialReader.from_settings(settings).start(fail_fast=True)
        try:
            outcome = capture_package(reader, settings, patient, outbox=outbox, clock=clock,
                                      out_root=args.out, seconds=settings.capture_seconds,
                                      progress=progress, withheld=args.no_upload)
        finally:
            reader.stop()
    if outcome.rejected:
        echo(str(outcome.folder))
        raise CaptureRejected(rejection_message(settings, outcome))
    for reason in outcome.record.quality.reasons:
        echo(f"warning: {reason}", err=True)
    if outcome.held is not None:
        echo(f"warning: {HELD_WARNING}", err=True)
    elif outcome.queued:
        echo(f"queued {outcome.info.stamp if outcome.info else ''} for upload", err=True)
    else:
        echo(f"not queued: {outcome.disposition.reason}", err=True)
    echo(str(outcome.folder))
    return 0


def via_service(settings: Settings, args: argparse.Namespace,
                patient: dict[str, Any] | None) -> int | None:
    """Hand the capture to a running service and wait; None when no service runs."""
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
                           no_upload=bool(args.no_upload), timeout_s=timeout_s)
    result = spool.wait(request, timeout_s=timeout_s)
    if result.get("ok"):
        for warning in result.get("warnings") or ():
            echo(f"warning: {warning}", err=True)
    if result.get("held"):
        echo("warning: the clock is not synchronised, so the record cannot be named yet; it "
             "is held and will be packaged once the clock is known", err=True)
    if result.get("queued"):
        echo("queued for upload by the service", err=True)
    elif result.get("ok") and result.get("disposition") not in (None, "queued"):
        echo(f"not queued: {result.get('disposition')}", err=True)
    if result.get("folder"):
        echo(str(result["folder"]))
    if result.get("ok"):
        return 0
    error = AgentError(str(result.get("error") or "the service could not capture"))
    error.exit_code = int(result.get("exit_code") or 1)
    raise error
