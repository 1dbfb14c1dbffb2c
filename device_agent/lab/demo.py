"""`device-agent demo`: the whole job end to end on embedded defaults, with real parts.

A board simulator streams a real recording over a pseudo-terminal, the agent's own reader
captures 10 s from it, the package is built (JSON, PDF, patient details, manifest), queued in
the SQLite outbox, uploaded over real HTTP to an S3-compatible endpoint on 127.0.0.1 (moto's
server, in-process), verified object by object, and the bucket tree is printed in the form of
the layout document. Nothing is left running.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from device_agent.assemble import assembled
from device_agent.capture import capture_package
from device_agent.core.config import Settings
from device_agent.core.errors import AgentError
from device_agent.documents.pdf import measurement_rows
from device_agent.lab.simulator import BoardSimulator
from device_agent.shipping.verify import delivered_items, verify_objects

log = logging.getLogger(__name__)

DEMO_BUCKET = "demo-ecg-bucket"
DEMO_SERIAL = "DEMO-0001"
# Gain the simulated board and the reader share: HR06000's tallest precordial R waves fit
# the 12-bit range at 500 counts/mV, where the unit default of 1000 would clip them.
DEMO_COUNTS_PER_MV = 500.0
# A synthetic patient: no real person's identity is ever used in fixtures or demos.
DEMO_PATIENT = {"patient_name": "Demo Patient", "age": 59, "gender": "Female",
                "doctor": "Dr. Example", "Org.": "Demo Clinic"}
_KIND_ORDER = ("ECG_Report_", "patient_details_", "ecg_data_", "ECG_", "manifest_")


def default_record() -> Path:
    """The real recording shipped inside the package (HR06000, PTB-XL, CC BY 4.0)."""
    return Path(__file__).resolve().parent / "data" / "HR06000"


def bucket_tree(bucket: str, keys: Iterable[str]) -> str:
    """Draw keys as the layout document draws them (`s3://bucket/` then a box-drawing tree)."""
    tree: dict[str, Any] = {}
    for key in keys:
        node = tree
        for part in key.split("/"):
            node = node.setdefault(part, {})

    def order(name: str) -> tuple[int, str, bool, str]:
        # The layout document's order: report PDF, its JSON twin, patient details, data, then
        # the DICOM copy and our manifest; folders and anything else after.
        rank = next((i for i, p in enumerate(_KIND_ORDER) if name.startswith(p)), -1)
        stem, _, ext = name.rpartition(".")
        return (rank, stem, ext != "pdf", name)

    lines = [f"s3://{bucket}/"]

    def walk(node: dict[str, Any], prefix: str) -> None:
        names = sorted(node, key=order)
        for i, name in enumerate(names):
            last = i == len(names) - 1
            is_dir = bool(node[name])
            lines.append(f"{prefix}{'└── ' if last else '├── '}{name}{'/' if is_dir else ''}")
            if is_dir:
                walk(node[name], prefix + ("    " if last else "│   "))

    walk(tree, "")
    return "\n".join(lines)


def demo_settings(settings: Settings, *, out: Path, link: Path, endpoint: str) -> Settings:
    """The embedded defaults: local folders, the simulated board, the local endpoint."""
    return settings.replace(
        cloud_upload_enabled=True, cloud_service="s3",
        s3_bucket=DEMO_BUCKET, s3_region="us-east-1", s3_endpoint_url=endpoint,
        aws_access_key_id="demo", aws_secret_access_key="demo", aws_session_token=None,
        aws_profile=None, s3_sse="aes256", s3_sse_kms_key_id=None,
        serial_port=str(link), counts_per_mv=DEMO_COUNTS_PER_MV, byte_order="high-first",
        device_serial=DEMO_SERIAL, state_dir=out / "state", reports_dir=out / "reports",
        users_file=out / "users.json", capture_seconds=10.0, disk_reserve_mb=0,
        # The demo machine's clock may lack NTP evidence (containers do); a clock past the
        # floor year is trusted here, which a unit with a battery-backed RTC also chooses.
        clock_check="floor",
    )


def run_demo(settings: Settings, *, out: Path, record_path: Path, speed: float,
             echo: Callable[[str], None],
             progress: Callable[[int, int], None] | None = None) -> int:
    """Simulate, capture, package, upload, verify; print the tree. Returns an exit code."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        raise AgentError("the demo needs moto's S3 server: run 'make demo', or "
                         "pip install 'device_agent[demo]' in this environment") from exc

    out.mkdir(parents=True, exist_ok=True)
    link = out / "board-tty"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s = demo_settings(settings, out=out, link=link, endpoint=endpoint)
        echo(f"S3-compatible endpoint (moto) on {endpoint}, bucket {DEMO_BUCKET}")
        # the parts the service and `sync --once` use, on the demo's board and endpoint
        with assembled(s, stop=threading.Event()) as parts:
            uploader = parts.uploader
            if uploader is None:  # demo_settings turns uploads on
                raise AgentError("the demo uploads: CLOUD_UPLOAD_ENABLED must be true")
            uploader.client.create_bucket(Bucket=DEMO_BUCKET)
            with BoardSimulator(record_path, link, counts_per_mv=s.counts_per_mv,
                                byte_order=s.byte_order, speed=speed, loop=True):
                echo(f"board simulator replaying {record_path.name} on {link.name} at "
                     f"{speed:g}x real time (a 10 s record takes {10 / speed:.1f} s here)")
                reader = parts.reader().start(fail_fast=True)
                try:
                    outcome = capture_package(reader, s, DEMO_PATIENT, outbox=parts.outbox,
                                              clock=parts.clock, progress=progress)
                finally:
                    reader.stop()
            record, info = outcome.record, outcome.info
            q = record.quality
            echo(f"captured {record.n_samples} samples x 12 leads at {record.sampling_rate} "
                 f"Hz: verdict {q.verdict}, {q.frames_lost} frames lost")
            if info is None or not outcome.queued:
                raise AgentError(f"the demo capture was not packaged and queued ({q.verdict}: "
                                 f"{'; '.join(q.reasons) or 'clock not synchronised'}); see "
                                 f"{outcome.folder}")
            echo(f"package {info.stamp} written ({len(info.files)} files and a manifest)")
            echo("measured: " + "  ".join(f"{label} {value}" for label, value
                                          in measurement_rows(record.measurements)))

            loop = parts.sync_loop()
            try:
                result = loop.run_once()
            finally:
                loop.close()
            echo(f"sync pass: {result.summary()}")
            findings = verify_objects(uploader, delivered_items(parts.outbox))
        bad = [f for f in findings if not f.ok]
        echo(f"verified {len(findings)} objects by SHA-256: "
             f"{len(findings) - len(bad)} intact, {len(bad)} missing or different")

        keys = list(uploader.list_prefix(""))
        echo("")
        echo(bucket_tree(DEMO_BUCKET, keys))
        echo("")
        echo(f"report (PDF): {_shown(info.folder / f'ECG_Report_{info.stamp}.pdf')}")
        return 0 if findings and not bad and result.pending == 0 else 1
    finally:
        server.stop()


def _shown(path: Path) -> Path:
    """A path as the user can type it from where they ran the demo."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path
