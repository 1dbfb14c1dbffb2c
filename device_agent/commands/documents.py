"""`report`, `measure` and `export`: the documents of a stored record, made again.

`report` re-renders the PDF; `measure` re-measures records (ecg_data JSON, current or
legacy, or WFDB .hea) and with --json prints one object a line per input, in input order,
exit 1 if any input could not be read; `export` writes the DICOM copy or a WFDB record.

A record that carries no measurements (a legacy record, one from another program) is
measured by `report` and by `export --format dicom` as a capture is, once, before it is
rendered; the PDF's footer says the values were measured at rendering, and the PDF and the
DICOM copy of one record carry the same values. A record that was measured keeps its own
values, nulls and reasons included (they are the capture's verdict, not a gap).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from device_agent.commands import echo
from device_agent.core.config import Settings
from device_agent.core.errors import AgentError, DiskSpaceError
from device_agent.core.fsutil import (
    FileTooLarge,
    NotRegularFile,
    atomic_write,
    is_disk_full,
    read_regular,
)

# The largest record the unit captures (60 s of 12 leads at 2000 Hz) is under 9 MiB as
# ecg_data JSON; reading one costs ~10x its size in RAM, so 16 MiB keeps a re-render
# inside the unit's MemoryMax=300M (a 46 MB file peaked at 446 MB).
MAX_INPUT_BYTES = 16 << 20
MIN_RATE, MAX_RATE = 50, 20_000  # Hz: what a stored ECG can have been sampled at


def _read(path: Path, what: str) -> bytes:
    try:
        return read_regular(path, max_bytes=MAX_INPUT_BYTES)
    except FileTooLarge as exc:
        raise AgentError(f"{what} {path} is {exc.strerror}, larger than any record the unit "
                         "captures (60 s at most); pass one record's file") from None
    except NotRegularFile as exc:
        raise AgentError(f"{what} {path} is {exc.strerror}; pass the file itself") from None
    except OSError as exc:
        raise AgentError(f"cannot read {what} {path}: {exc.strerror}; check the path") from None


def load_ecg_json(path: Path) -> Any:
    """A stored ecg_data JSON (current or legacy) as a Record; one-line errors."""
    from device_agent.documents.ecgdata import loads

    try:
        record = loads(_read(path, "ecg data"), source=str(path))
    except ValueError as exc:
        raise AgentError(f"{exc}") from exc
    except RecursionError:  # json's parser recurses once per [ or {
        raise AgentError(f"{path}: JSON nested too deeply to be an ecg_data document; the "
                         "file is damaged") from None
    except OverflowError:  # int(Infinity)
        raise AgentError(f"{path}: sampling_rate is not a finite integer; the file is "
                         "damaged") from None
    if not MIN_RATE <= record.sampling_rate <= MAX_RATE:
        raise AgentError(f"{path}: sampling_rate {record.sampling_rate} Hz is outside "
                         f"{MIN_RATE}..{MAX_RATE}, not an ECG's; the file is damaged")
    return record


def load_patient(path: Path | None) -> dict[str, Any] | None:
    """A patient file read and checked as `capture --patient` does (one gate, one reader)."""
    from device_agent.documents.patient import read_patient, validate_patient

    doc = read_patient(path)
    return None if doc is None else validate_patient(doc)


def _write(out: Path, data: bytes, what: str) -> None:
    try:
        atomic_write(out, data)
    except FileNotFoundError:
        raise AgentError(f"cannot write {what} {out}: its folder does not exist") from None
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskSpaceError(f"disk full writing {what} {out}: nothing was written; free "
                                 "space and run it again") from None
        raise AgentError(f"cannot write {what} {out}: {exc.strerror}; check the folder"
                         ) from None


MEASURED_AT_RENDERING = "measured at rendering"  # the record carried no measurements


def with_measurements(record: Any, mains_hz: float) -> Any:
    """The record as it is when it carries measurements, else measured now (and says so)."""
    from device_agent.capture import measure_once
    from device_agent.clinical.measurements import MEASUREMENT_NAMES

    held = record.measurements or {}
    if any(name in held for name in MEASUREMENT_NAMES) or held.get("not_measured_reason"):
        return record
    measured = measure_once(record, mains_hz=mains_hz)
    block = dict(measured.measurements)
    block["method"] = f"{block.get('method', '')}; {MEASURED_AT_RENDERING}"
    block["measured_at_rendering"] = True
    return dataclasses.replace(measured, measurements=block)


def report(settings: Settings, args: argparse.Namespace) -> int:
    """Re-render a PDF report from a stored ecg_data JSON (and patient details)."""
    from device_agent.documents import pdf as pdf

    record = with_measurements(load_ecg_json(args.input), settings.mains_hz)
    data = pdf.render_pdf(record, load_patient(args.patient),
                          style=pdf.ReportStyle.from_settings(settings))
    _write(args.out, data, "report")
    echo(f"wrote {args.out} ({len(data)} bytes)")
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def export(settings: Settings, args: argparse.Namespace) -> int:
    """Write a stored record as the DICOM 12-lead ECG a package carries, or as WFDB."""
    record = load_ecg_json(args.input)
    if args.format == "wfdb":
        from device_agent.lab.wfdb import write_record

        if args.patient is not None:
            echo("warning: --patient is ignored for WFDB (it carries no patient block)",
                 err=True)
        try:
            hea, dat = write_record(record, args.out)
        except ValueError as exc:
            raise AgentError(f"--out {args.out}: {exc}") from None
        except OSError as exc:
            raise AgentError(f"cannot write {args.out}.hea/.dat: {exc.strerror}") from None
        echo(f"wrote {hea} and {dat}")
        return 0
    from device_agent.capture import PackageEncoders

    patient = load_patient(args.patient) or {}
    record = with_measurements(record, settings.mains_hz)
    try:
        data = PackageEncoders(settings.replace(package_dicom=True)).dicom(record, patient)
    except ValueError as exc:
        raise AgentError(f"{args.input}: cannot be a DICOM 12-lead ECG: {exc}") from None
    if data is None:
        raise AgentError(f"{args.input}: cannot be a DICOM 12-lead ECG (see the warning above)")
    _write(args.out, data, "DICOM file")
    echo(f"wrote {args.out} ({len(data)} bytes)")
    return 0


def load_any_record(path: Path) -> Any:
    """A stored record to measure: ecg_data JSON (current or legacy) or a WFDB .hea."""
    if path.suffix == ".hea":
        from device_agent.lab.wfdb import to_record

        try:
            return to_record(path)
        except ValueError as exc:  # the reader's line names the file and what to do
            raise AgentError(str(exc)) from None
        except (OSError, IndexError) as exc:
            raise AgentError(f"cannot read WFDB record {path}: {exc}") from None
    return load_ecg_json(path)


def measure(settings: Settings, args: argparse.Namespace) -> int:
    """Measure stored records; with --json one object a line per input, in input order."""
    from device_agent.clinical.measurements import (
        MEASUREMENT_NAMES,
        measure_record,
        measurements_block,
    )

    failed = 0
    for path in args.files:
        try:
            record = load_any_record(path)
            block = measurements_block(measure_record(record, mains_hz=settings.mains_hz))
        except AgentError as exc:
            failed += 1
            if args.json:
                echo(json.dumps({"input": str(path), "error": str(exc)}))
            else:
                # one line naming the input once (most messages already start with it)
                echo(str(exc) if str(path) in str(exc) else f"{path}: {exc}", err=True)
            continue
        values = {name: _jsonable(block.get(name)) for name in MEASUREMENT_NAMES}
        if args.json:
            echo(json.dumps({"input": str(path), **values,
                             "reasons": block.get("reasons") or {}}))
        else:
            echo(f"{path}: " + "  ".join(f"{label} {value}" for label, value in
                                         _measurement_rows(values)))
    return 1 if failed else 0


def _measurement_rows(values: dict[str, Any]) -> list[tuple[str, str]]:
    from device_agent.documents.pdf import measurement_rows

    return measurement_rows(values)
