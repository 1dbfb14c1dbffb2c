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


def cmd_capture(settings: Any, args: Any) -> int:
    """`device-agent capture`: one record from the board into OUT/{stamp}/, then the outbox."""
    from device_agent.cli import echo
    from device_agent.package import build_package, validate_patient

    patient = _read_patient(getattr(args, "patient", None))
    validate_patient(patient)  # refuse a bad patient file before occupying the board
    if not getattr(args, "direct", False):
        from device_agent.service import capture_via_service

        handed = capture_via_service(settings, args, patient)  # None: no service runs
        if handed is not None:
            return handed
    out = args.out or settings.state_dir / "records"
    progress = ProgressBar() if sys.stdout.isatty() else None
    record = capture_record(settings.serial_port, settings, seconds=settings.capture_seconds,
                            progress=progress)
    info = build_package(record, patient, Path(out), settings)
    q = record.quality
    if q.verdict == VERDICT_REJECTED:
        echo(str(info.folder))
        raise CaptureRejected(
            f"capture from {settings.serial_port} rejected: {'; '.join(q.reasons)}. Files kept "
            f"in {info.folder} (marked rejected, not queued); check the cable and capture again"
        )
    for reason in q.reasons:
        echo(f"warning: {reason}", err=True)
    if not args.no_upload:
        from device_agent.outbox import Outbox

        with Outbox.open(settings) as outbox:
            outbox.add_package(info)
        echo(f"queued {info.stamp} for upload", err=True)
    echo(str(info.folder))
    return 0
