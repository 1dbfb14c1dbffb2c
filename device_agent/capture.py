"""One capture: N seconds of frames from the board become a Record, then a package.

The wall clock is read ONCE, when the capture starts (`clock`, a collaborator); the rate is
settings.sampling_rate, never measured. Sample positions come from the frame counter, so
a lost frame is a missing sample in its own place. A record that lost too much is still
written (marked rejected) and then reported with CaptureRejected.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from device_agent import __version__
from device_agent.errors import CaptureRejected, PatientDetailsError, SerialLinkError
from device_agent.framing import Frames
from device_agent.port import SerialReader
from device_agent.record import VERDICT_REJECTED, DeviceInfo, Record, build_record

log = logging.getLogger(__name__)

EXTRA_WAIT_S = 10.0  # beyond the capture length, how long to wait for a silent board


def local_now() -> datetime:
    """Timezone-aware local wall-clock time (the production `clock`)."""
    return datetime.now().astimezone()


def capture_record(
    source: SerialReader | str,
    settings: Any,
    *,
    seconds: float | None = None,
    clock: Callable[[], datetime] = local_now,
    progress: Callable[[int, int], None] | None = None,
    timeout_s: float | None = None,
    monotonic: Callable[[], float] = time.monotonic,
) -> Record:
    """Capture `seconds` of signal from a running reader (or a port URL opened here)."""
    seconds = settings.capture_seconds if seconds is None else seconds
    n = round(seconds * settings.sampling_rate)
    timeout_s = seconds + EXTRA_WAIT_S if timeout_s is None else timeout_s
    own = isinstance(source, str)
    reader = SerialReader.from_settings(settings, source).start(fail_fast=True) if own \
        else source
    try:
        reader.clear()  # frames from before the request are not this capture's
        resyncs0 = reader.decoder.resyncs
        acquired_at = clock()
        batches: list[Frames] = []
        first: int | None = None
        done = 0
        deadline = monotonic() + timeout_s
        while done < n:
            remaining = deadline - monotonic()
            if remaining <= 0:
                break
            frames = reader.get(min(0.1, remaining))
            if frames is None or not len(frames):
                continue
            if first is None:
                first = int(frames.position[0])
            batches.append(frames)
            done = int(frames.position[-1]) - first + 1
            if progress is not None:
                progress(min(done, n), n)
        bad_frames = reader.decoder.resyncs - resyncs0
    finally:
        if own:
            reader.stop()
    if first is None:
        state = reader.state
        raise SerialLinkError(
            f"no frames from the board on {reader.url} within {timeout_s:.0f} s "
            f"({'connected' if state.connected else 'not connected'}, "
            f"{state.bytes_read} bytes read): check the board is powered and cabled, and "
            f"ECG_BYTE_ORDER / ECG_BAUD_RATE"
        )
    if done < n:
        log.warning("board on %s stopped sending after %d of %d samples", reader.url, done, n)
    frames = Frames.concat(batches)
    device = DeviceInfo(serial=settings.device_serial, model=settings.device_model,
                        agent_version=__version__)
    record = build_record(
        frames.position - first, frames.counts, frames.electrodes, n_samples=n,
        acquired_at=acquired_at, settings=settings, device=device,
        record_id=str(uuid.uuid4()), bad_frames=bad_frames,
    )
    log.info("captured %d samples from %s: %s%s", n, reader.url, record.quality.verdict,
             "".join(f"; {r}" for r in record.quality.reasons))
    return record


def _read_patient(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PatientDetailsError(
            f"cannot read patient details {path}: {exc}; pass a JSON object file"
        ) from exc


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


@dataclass(frozen=True)
class CaptureOutcome:
    """What became of one capture: a package (maybe queued), or a record held for the clock."""

    record: Record
    info: Any | None = None  # package.PackageInfo; None while held
    held: Path | None = None
    queued: bool = False

    @property
    def folder(self) -> Path:
        return self.info.folder if self.info is not None else self.held

    @property
    def rejected(self) -> bool:
        return self.record.quality.verdict == VERDICT_REJECTED


def capture_package(
    source: SerialReader | str,
    settings: Any,
    patient: dict | None,
    *,
    out_root: Path | None = None,
    outbox: Any | None = None,
    clock: Any | None = None,
    seconds: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    no_upload: bool = False,
) -> CaptureOutcome:
    """Capture, then package and queue; with an unsynchronised clock, hold the record instead.

    The CLI and the service both come through here, so disk reserve, clock and rejection
    rules are the same whoever asked for the capture.
    """
    from device_agent.clock import HoldTicket, clock_from_settings
    from device_agent.disk import ensure_free_space
    from device_agent.package import build_package

    out_root = Path(out_root or Path(settings.state_dir) / "records")
    clock = clock or clock_from_settings(settings)
    ensure_free_space(settings, Path(settings.state_dir))
    ticket = None if clock.synced() else HoldTicket.now(clock)
    record = capture_record(source, settings, seconds=seconds, clock=clock.now,
                            progress=progress)
    if ticket is not None:
        held = hold_record(settings, record, patient, ticket, out_root=out_root,
                           no_upload=no_upload)
        return CaptureOutcome(record, held=held)
    info = build_package(record, patient, out_root, settings)
    queued = False
    if record.quality.verdict != VERDICT_REJECTED and not no_upload and outbox is not None:
        outbox.add_package(info)
        queued = True
    return CaptureOutcome(record, info=info, queued=queued)


HELD_WARNING = ("the clock is not synchronised, so the record cannot be named yet; it is held "
                "and will be packaged and queued once the clock is known (device-agent status "
                "shows the clock)")


def rejection_message(settings: Any, outcome: CaptureOutcome) -> str:
    """One line for a rejected capture: why, where its files are kept, what to do."""
    return (f"capture from {settings.serial_port} rejected: "
            f"{'; '.join(outcome.record.quality.reasons)}. Files kept in {outcome.folder} "
            "(marked rejected, not queued); check the cable and capture again")


def held_dir(settings: Any) -> Path:
    """Where records captured before the clock was synchronised wait for their names."""
    return Path(settings.state_dir) / "held"


def hold_record(settings: Any, record: Record, patient: dict | None, ticket: Any, *,
                out_root: Path, no_upload: bool) -> Path:
    """Park a record (JSON, patient block, request) until the clock can name it."""
    from device_agent.clock import hold
    from device_agent.ecgdata import dumps

    request = {"out_root": str(out_root), "no_upload": no_upload}
    return hold(held_dir(settings), {
        "ecg_data.json": dumps(record),
        "patient.json": json.dumps(patient).encode("utf-8"),
        "request.json": json.dumps(request).encode("utf-8"),
    }, ticket)


def release_held(settings: Any, *, outbox: Any, clock: Any) -> list[Any]:
    """Name, package and queue held records once the clock is known; returns the packages.

    Idempotent across crashes: build_package reuses the folder of the same record id and
    add_package ignores a package it already has; the held copy goes only after both.
    Records held in an earlier boot can never be dated from the monotonic clock: they move to
    STATE_DIR/undated/ for a person to decide, and are never named from a guess.
    """
    import dataclasses
    import shutil

    from device_agent.clock import ready
    from device_agent.ecgdata import loads
    from device_agent.package import build_package

    stampable, orphaned = ready(held_dir(settings), clock)
    for folder in orphaned:
        undated = Path(settings.state_dir) / "undated" / folder.name
        undated.parent.mkdir(parents=True, exist_ok=True)
        folder.rename(undated)
        log.error("held capture %s was taken before a reboot with the clock unsynchronised; "
                  "its time cannot be known. Moved to %s: name it by hand or discard it",
                  folder.name, undated)
    released = []
    for folder, when in stampable:
        record = loads((folder / "ecg_data.json").read_bytes(), source=str(folder))
        record = dataclasses.replace(record, acquired_at=when.astimezone())
        patient = json.loads((folder / "patient.json").read_bytes())
        request = json.loads((folder / "request.json").read_bytes())
        info = build_package(record, patient, Path(request["out_root"]), settings)
        if record.quality.verdict != VERDICT_REJECTED and not request["no_upload"]:
            outbox.add_package(info)
        shutil.rmtree(folder)
        log.info("held capture named %s now that the clock is synchronised", info.stamp)
        released.append(info)
    return released


def cmd_capture(settings: Any, args: Any) -> int:
    """`device-agent capture`: one record from the board into OUT/{stamp}/, then the outbox."""
    from device_agent.cli import echo
    from device_agent.outbox import Outbox
    from device_agent.package import validate_patient

    patient = _read_patient(getattr(args, "patient", None))
    validate_patient(patient)  # refuse a bad patient file before occupying the board
    if not getattr(args, "direct", False):
        from device_agent.service import capture_via_service

        handed = capture_via_service(settings, args, patient)  # None: no service runs
        if handed is not None:
            return handed
    progress = ProgressBar() if sys.stdout.isatty() else None
    with Outbox.open(settings) as outbox:
        outcome = capture_package(settings.serial_port, settings, patient, out_root=args.out,
                                  outbox=outbox, seconds=settings.capture_seconds,
                                  progress=progress, no_upload=args.no_upload)
    if outcome.rejected:
        echo(str(outcome.folder))
        raise CaptureRejected(rejection_message(settings, outcome))
    for reason in outcome.record.quality.reasons:
        echo(f"warning: {reason}", err=True)
    if outcome.held is not None:
        echo(f"warning: {HELD_WARNING}", err=True)
    elif outcome.queued:
        echo(f"queued {outcome.info.stamp} for upload", err=True)
    echo(str(outcome.folder))
    return 0
