"""One capture: N seconds of frames from the board become a measured Record, then a package.

The capture starts at the first frame that arrives after it was asked for: whatever the port
had buffered before is discarded (SerialReader.clear), and the record's one timestamp is the
wall-clock time of its first sample. The rate is settings.sampling_rate, never measured.
Sample positions come from the frame counter, so a lost frame is a missing sample in its own
place. Measurements are computed here, once, and stored in the record; the JSON, the PDF and
the DICOM copy only render them.

What becomes of the capture is decided once (package.decide): a rejected capture and one the
operator withheld are written with their decision and never queued; with an unsynchronised
clock the record is held (clock.py) and packaged once the time is known.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from device_agent import __version__
from device_agent.clinical.measurements import measure_record, measurements_block
from device_agent.core.clock import (
    Clock,
    HoldTicket,
    held_dir,
    hold,
    name_held,
    ready,
    release_folder,
    sweep_released,
)
from device_agent.core.config import Settings
from device_agent.core.errors import SerialLinkError
from device_agent.core.fsutil import fsync_dir, make_dirs
from device_agent.core.record import VERDICT_REJECTED, DeviceInfo, Record, build_record
from device_agent.documents import ecgdata, pdf
from device_agent.documents.package import (
    DISPOSITIONS,
    QUEUED,
    REJECTED,
    WITHHELD,
    Disposition,
    PackageInfo,
    build_package,
    decide,
    has_manifest,
    load_package,
    package_folders,
    read_disposition,
)
from device_agent.link.framing import Frames
from device_agent.link.port import FrameSource
from device_agent.ops.disk import ensure_free_space
from device_agent.shipping.outbox import DELIVERED, Outbox

log = logging.getLogger(__name__)

EXTRA_WAIT_S = 10.0  # beyond the capture length, how long to wait for a silent board
HELD_WARNING = ("the clock is not synchronised, so the record cannot be named yet; it is held "
                "and will be packaged and queued once the clock is known (device-agent status "
                "shows the clock)")


def capture_record(
    reader: FrameSource,
    settings: Settings,
    *,
    clock: Clock,
    seconds: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    timeout_s: float | None = None,
    record_id: str | None = None,
) -> Record:
    """Capture `seconds` of signal from a running reader, starting after this call starts.

    `record_id` names the record (a spool request's derived id); a fresh uuid4 otherwise.
    """
    seconds = settings.capture_seconds if seconds is None else seconds
    rate = settings.sampling_rate
    n = round(seconds * rate)
    timeout_s = seconds + EXTRA_WAIT_S if timeout_s is None else timeout_s
    reader.clear()
    resyncs0 = reader.decoder.resyncs
    started = clock.monotonic()
    wall_at_start = clock.now()
    batches: list[Frames] = []
    first: int | None = None
    first_at: float | None = None
    done = 0
    deadline = started + timeout_s
    while done < n:
        remaining = deadline - clock.monotonic()
        if remaining <= 0:
            break
        frames = reader.get(min(0.1, remaining))
        if frames is None or not len(frames):
            continue
        if first is None:
            first = int(frames.position[0])
            first_at = _first_sample_at(frames, started, reader.decoder.sampling_rate)
        batches.append(frames)
        done = int(frames.position[-1]) - first + 1
        if progress is not None:
            progress(min(done, n), n)
    bad_frames = reader.decoder.resyncs - resyncs0
    if first is None or first_at is None:
        state = reader.state
        raise SerialLinkError(
            f"no frames from the board on {reader.url} within {timeout_s:.0f} s "
            f"({'connected' if state.connected else 'not connected'}, "
            f"{state.bytes_read} bytes read): check the board is powered and cabled, and "
            f"ECG_BYTE_ORDER / ECG_BAUD_RATE")
    if done < n:
        log.warning("board on %s stopped sending after %d of %d samples", reader.url, done, n)
    frames = Frames.concat(batches)
    device = DeviceInfo(serial=settings.device_serial, model=settings.device_model,
                        agent_version=__version__)
    acquired_at = wall_at_start + timedelta(seconds=max(0.0, first_at - started))
    record = build_record(
        frames.position - first, frames.counts, frames.electrodes, n_samples=n,
        acquired_at=acquired_at, settings=settings, device=device,
        record_id=record_id or str(uuid.uuid4()), bad_frames=bad_frames,
    )
    log.info("captured %d samples from %s: %s%s", n, reader.url, record.quality.verdict,
             "".join(f"; {r}" for r in record.quality.reasons))
    return record


def _first_sample_at(frames: Frames, started: float, rate: float) -> float:
    """When the first frame of the first batch left the board (monotonic seconds).

    reader.clear() has discarded everything that arrived before the capture started, so the
    batch is new; its frames were read together at `arrival`, the first of them about
    (n - 1) sample periods earlier (the decoder knows the rate, a sped-up simulator's too).
    """
    if frames.arrival is None:
        return started
    return max(started, frames.arrival - (len(frames) - 1) / rate)


def measure_once(record: Record, *, mains_hz: float) -> Record:
    """The record with its measurements: computed here, once, and only rendered after."""
    block = measurements_block(measure_record(record, mains_hz=mains_hz))
    return dataclasses.replace(record, measurements=block)


class PackageEncoders:
    """The bytes of a package from a measured record: JSON, PDF, and the DICOM copy."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.style = pdf.ReportStyle.from_settings(settings)

    def ecg_json(self, record: Record) -> bytes:
        return ecgdata.dumps(record)

    def pdf(self, record: Record, patient: Mapping[str, Any]) -> bytes:
        return pdf.render_pdf(record, patient, style=self.style)

    def dicom(self, record: Record, patient: Mapping[str, Any]) -> bytes | None:
        """The DICOM 12-lead ECG copy (PACKAGE_DICOM), or None when off or not encodable."""
        if not self.settings.package_dicom:
            return None
        # imported here: pydicom holds about 6 MB resident, which a unit with the copy off
        # (PACKAGE_DICOM=false) never pays
        from device_agent.documents import dicom

        style = self.style
        try:
            return dicom.encode_ecg(
                record, patient,
                equipment=dicom.Equipment.of(record.device,
                                             manufacturer=self.settings.device_manufacturer),
                filters=dicom.DisplayFilter(style.highpass_hz, style.lowpass_hz,
                                            style.notch_hz))
        except ValueError as exc:  # e.g. a rate outside DICOM ECG's 200-1000 Hz
            log.warning("no DICOM copy for record %s: %s", record.record_id, exc)
            return None


@dataclass(frozen=True)
class CaptureOutcome:
    """What became of one capture: a package (queued or not), or a record held for the clock."""

    record: Record
    disposition: Disposition
    info: PackageInfo | None = None
    held: Path | None = None

    @property
    def folder(self) -> Path:
        folder = self.info.folder if self.info is not None else self.held
        assert folder is not None
        return folder

    @property
    def queued(self) -> bool:
        return self.info is not None and self.disposition.decision == QUEUED

    @property
    def rejected(self) -> bool:
        return self.record.quality.verdict == VERDICT_REJECTED


def package_and_decide(record: Record, patient: Mapping[str, Any] | None, settings: Settings,
                       outbox: Outbox, *, out_root: Path, withheld: bool,
                       checkpoint: Callable[[str], None] = lambda name: None) -> CaptureOutcome:
    """Write a measured record's package with its decision; queue it only if decided so."""
    decision = decide(record, withheld=withheld)
    info = build_package(record, patient, out_root, device_serial=settings.device_serial,
                         encoders=PackageEncoders(settings), disposition=decision,
                         checkpoint=checkpoint)
    if decision.uploads:
        outbox.packages.add(info)
        checkpoint("capture.queued")
    else:
        outbox.packages.record(info.folder, stamp=info.stamp, record_id=info.record_id,
                               disposition=decision.decision, reason=decision.reason,
                               verdict=record.quality.verdict)
    return CaptureOutcome(record, decision, info=info)


def capture_package(
    reader: FrameSource,
    settings: Settings,
    patient: Mapping[str, Any] | None,
    *,
    outbox: Outbox,
    clock: Clock,
    out_root: Path | None = None,
    seconds: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    withheld: bool = False,
    checkpoint: Callable[[str], None] = lambda name: None,
    record_id: str | None = None,
) -> CaptureOutcome:
    """Capture, measure once, then package with its decision, or hold it for the clock.

    The CLI and the service both come through here, so disk reserve, clock, rejection and
    withholding rules are the same whoever asked for the capture.
    """
    out_root = Path(out_root or Path(settings.state_dir) / "records")
    ensure_free_space(Path(settings.state_dir), settings.disk_reserve_mb)
    ticket = None if clock.synced() else HoldTicket.now(clock)
    record = capture_record(reader, settings, clock=clock, seconds=seconds, progress=progress,
                            record_id=record_id)
    record = measure_once(record, mains_hz=settings.mains_hz)
    if ticket is not None:
        held = hold_record(settings, record, patient, ticket, out_root=out_root,
                           withheld=withheld)
        return CaptureOutcome(record, decide(record, withheld=withheld), held=held)
    return package_and_decide(record, patient, settings, outbox, out_root=out_root,
                              withheld=withheld, checkpoint=checkpoint)


def rejection_message(settings: Settings, outcome: CaptureOutcome) -> str:
    """One line for a rejected capture: why, where its files are kept, what to do."""
    return (f"capture from {settings.serial_port} rejected: "
            f"{'; '.join(outcome.record.quality.reasons)}. Files kept in {outcome.folder} "
            "(marked rejected, never uploaded); check the cable and capture again")


def hold_record(settings: Settings, record: Record, patient: Mapping[str, Any] | None,
                ticket: HoldTicket, *, out_root: Path, withheld: bool) -> Path:
    """Park a record (JSON, patient block, request) until the clock can name it."""
    request = {"out_root": str(out_root), "no_upload": withheld}
    return hold(held_dir(settings.state_dir), {
        "ecg_data.json": ecgdata.dumps(record),
        "patient.json": json.dumps(patient).encode("utf-8"),
        "request.json": json.dumps(request).encode("utf-8"),
    }, ticket)


def release_held(settings: Settings, *, outbox: Outbox, clock: Clock,
                 checkpoint: Callable[[str], None] = lambda name: None
                 ) -> list[CaptureOutcome]:
    """Name, package and decide held records once the clock is known; returns them.

    Idempotent across crashes: the name (time and record id) is made durable in the held
    folder before any file is written under it, and a retry reuses it, whatever the clock
    reads by then; build_package reuses the folder of the same record id and outbox.packages.add
    ignores a package it already has; the held copy goes only after both.
    Records held in an earlier boot and never named can never be dated from the monotonic
    clock: they move to STATE_DIR/undated/ for a person to decide, never named from a guess.
    """
    folder_root = held_dir(settings.state_dir)
    if not folder_root.is_dir():
        return []
    sweep_released(folder_root)
    stampable, orphaned = ready(folder_root, clock)
    for folder in orphaned:
        undated = Path(settings.state_dir) / "undated" / folder.name
        make_dirs(undated.parent)
        folder.rename(undated)
        fsync_dir(undated.parent)
        fsync_dir(folder.parent)
        log.error("held capture %s was taken before a reboot with the clock unsynchronised; "
                  "its time cannot be known. Moved to %s: name it by hand or discard it",
                  folder.name, undated)
    released = []
    for folder, when in stampable:
        record = ecgdata.loads((folder / "ecg_data.json").read_bytes(), source=str(folder))
        name = name_held(folder, when, record.record_id or str(uuid.uuid4()))
        checkpoint("held.named")
        record = dataclasses.replace(record, acquired_at=name.acquired_at,
                                     record_id=name.record_id)
        patient = json.loads((folder / "patient.json").read_bytes())
        request = json.loads((folder / "request.json").read_bytes())
        outcome = package_and_decide(record, patient, settings, outbox,
                                     out_root=Path(request["out_root"]),
                                     withheld=bool(request["no_upload"]),
                                     checkpoint=checkpoint)
        checkpoint("held.packaged")
        release_folder(folder)
        log.info("held capture named %s now that the clock is synchronised",
                 outcome.info.stamp if outcome.info else "?")
        released.append(outcome)
    return released


# --- what a capture cut by a restart left -----------------------------------------------------

@dataclass(frozen=True)
class KeptCapture:
    """A capture found on disk by its record id: its package, or its held record."""

    record_id: str
    stamp: str | None  # None while held for the clock (not named yet) or undated
    state: str  # delivered, queued, withheld, rejected, held, undated
    folder: Path
    reason: str | None = None


def find_capture(settings: Settings, outbox: Outbox, record_id: str) -> KeptCapture | None:
    """What is kept of the capture with this record id; None when it left nothing.

    A package counts once its manifest is written (the outbox knows it, or its folder holds
    the manifest); a folder without one is the remains of a crash and does not. A record held
    for the clock (or undated) counts too: it is kept and will be (or can be) named.
    """
    rows = outbox.packages.of_record(record_id)
    if rows:  # the first package built for it (a crash can have made a second)
        row = rows[0]
        state = row.disposition
        if state == QUEUED:
            items = outbox.items.of_package(row.folder)
            if items and all(i.state == DELIVERED for i in items):
                state = DELIVERED
        return KeptCapture(record_id, row.stamp, state, Path(row.folder), row.reason)
    records = Path(settings.state_dir) / "records"
    if records.is_dir():
        folders = package_folders(records)
        known = outbox.packages.known(str(f.resolve()) for f in folders)
        for folder in reversed(folders):  # newest first: the capture was the latest
            if str(folder.resolve()) in known or not has_manifest(folder):
                continue
            try:
                info = load_package(folder)
                decision = read_disposition(folder)
            except (OSError, ValueError):
                continue
            if info.record_id == record_id:
                return KeptCapture(record_id, info.stamp,
                                   decision.decision if decision else QUEUED, folder,
                                   decision.reason if decision else None)
    for state, root in (("held", held_dir(settings.state_dir)),
                        ("undated", Path(settings.state_dir) / "undated")):
        if not root.is_dir():
            continue
        for folder in sorted(root.iterdir()):
            if _held_record_id(folder) == record_id:
                return KeptCapture(record_id, None, state, folder,
                                   WITHHELD if _held_withheld(folder) else None)
    return None


def _held_record_id(folder: Path) -> str | None:
    try:
        doc = json.loads((folder / "ecg_data.json").read_bytes())
    except (OSError, ValueError):
        return None
    rid = doc.get("record_id") if isinstance(doc, dict) else None
    return str(rid) if rid else None


def _held_withheld(folder: Path) -> bool:
    try:
        return bool(json.loads((folder / "request.json").read_bytes()).get("no_upload"))
    except (OSError, ValueError, AttributeError):
        return False


_KEPT_AS = {
    DELIVERED: "queued and uploaded",
    QUEUED: "queued for upload",
    WITHHELD: "kept on the unit, not uploaded (withheld by the operator)",
    "held": "held until the clock is synchronised, then named and queued",
    "undated": "held across a reboot: `device-agent doctor` says how to name it",
}


def kept_answer(kept: KeptCapture) -> dict[str, Any]:
    """The spool's answer for a capture a restart cut short whose record is kept.

    It names the record (id and stamp), never the patient: the answer is printed and logged.
    """
    named = f"record {kept.record_id}" + (f" ({kept.stamp})" if kept.stamp else "")
    kept_as = _KEPT_AS.get(kept.state, kept.state)
    if kept.state == "held" and kept.reason == WITHHELD:
        kept_as = "held until the clock is synchronised, then named and kept, not uploaded"
    base = {"record_id": kept.record_id, "stamp": kept.stamp, "folder": str(kept.folder),
            "recovered": True, "state": kept.state, "held": kept.state == "held",
            "queued": kept.state in (QUEUED, DELIVERED), "delivered": kept.state == DELIVERED,
            "disposition": kept.state if kept.state in DISPOSITIONS else
            QUEUED if kept.state == DELIVERED else None}
    if kept.state == REJECTED:
        return {**base, "ok": False, "exit_code": 1, "error": (
            f"the service restarted during this capture; it was kept as {named} but rejected "
            f"({kept.reason or 'quality'}), never uploaded: check the cable and capture again")}
    return {**base, "ok": True, "exit_code": 0, "warnings": [
        f"the service restarted during this capture, but the capture was kept as {named}, "
        f"{kept_as}: do not capture this patient again"]}
