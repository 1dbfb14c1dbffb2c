"""Helpers for the outbox/sync tests: small real packages on disk without rendering a record."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from device_agent.package import PackageFile, PackageInfo


def _write(path: Path, data: bytes, kind: str) -> PackageFile:
    path.write_bytes(data)
    return PackageFile(path.name, kind, path, len(data), hashlib.sha256(data).hexdigest())


def make_package(root: Path, stamp: str = "20260124_121815", *, seed: int = 0) -> PackageInfo:
    """Write three small data files and a manifest under root/stamp (manifest last)."""
    folder = root / stamp
    folder.mkdir(parents=True, exist_ok=True)
    rid = f"rec-{stamp}-{seed}"
    files = (
        _write(folder / f"ECG_Report_{stamp}.pdf", b"%PDF-1.4 " + bytes([seed % 256]) * 2000,
               "ecg_report_pdf"),
        _write(folder / f"patient_details_{stamp}.json",
               json.dumps({"first_name": "Synthetic", "seed": seed}).encode(), "patient_details"),
        _write(folder / f"ecg_data_{stamp}.json",
               json.dumps({"leads": {"I": [seed] * 500}}).encode(), "ecg_12lead_data"),
    )
    date_prefix = f"{stamp[:4]}/{stamp[4:6]}/{stamp[6:8]}"
    pkg = PackageInfo(folder, stamp, date_prefix, rid, "SN-TEST", files, files[0])
    manifest_doc = {
        "record_id": rid, "stamp": stamp,
        "files": [{"key": pkg.key(f), "size": f.size, "sha256": f.sha256} for f in files],
    }
    manifest = _write(folder / f"manifest_{stamp}.json",
                      json.dumps(manifest_doc).encode(), "manifest")
    return PackageInfo(folder, stamp, date_prefix, rid, "SN-TEST", files, manifest)
