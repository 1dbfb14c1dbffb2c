"""`device-agent demo` end to end: pty board, capture, package, HTTP S3, verify, tree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from device_agent.lab.demo import bucket_tree
from tests.helpers import present

SPEC = Path(__file__).resolve().parents[2] / "docs" / "s3-layout.md"
README = Path(__file__).resolve().parents[2] / "README.md"


def _example_tree(number: int) -> str:
    """The tree drawn under 'Example N' in the layout document, without its code fence."""
    text = SPEC.read_text(encoding="utf-8")
    block = text.split(f"### Example {number}", 1)[1].split("```", 2)[1]
    return block.strip("\n")


def test_bucket_tree_draws_the_layout_documents_example():
    stamp = "20260124_121815"
    keys = [f"ecg-reports/2026/01/24/{stamp}/{name}_{stamp}.{ext}"
            for name, ext in (("ecg_data", "json"), ("patient_details", "json"),
                              ("ECG_Report", "pdf"))]
    assert bucket_tree("my-ecg-bucket", keys) == _example_tree(2)
    simple = [f"ecg-reports/2026/01/24/ECG_Report_{stamp}.{ext}" for ext in ("json", "pdf")]
    assert bucket_tree("my-ecg-bucket", simple) == _example_tree(1)


@pytest.mark.functional
def test_demo_runs_end_to_end_and_prints_todays_layout(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "device_agent", "demo", "--out", str(tmp_path / "demo"),
         "--speed", "20"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    stamp = present(re.search(r"package (\d{8}_\d{6}) written", out)).group(1)
    date = f"{stamp[:4]}/{stamp[4:6]}/{stamp[6:8]}"
    keys = [f"ecg-reports/{date}/{stamp}/{n}_{stamp}.{e}" for n, e in (
        ("ECG_Report", "pdf"), ("patient_details", "json"), ("ecg_data", "json"),
        ("ECG", "dcm"), ("manifest", "json"))]
    # The printed tree is the layout document's Example 2 for the day it ran, plus the DICOM
    # copy and the manifest.
    assert bucket_tree("demo-ecg-bucket", keys) in out
    example = _example_tree(2).replace("my-ecg-bucket", "demo-ecg-bucket")
    example = example.replace("20260124_121815", stamp)
    for old, new in (("2026", stamp[:4]), ("01", stamp[4:6]), ("24", stamp[6:8])):
        example = example.replace(f"└── {old}/", f"└── {new}/", 1)
    example = example.replace("└── ecg_data", "├── ecg_data")  # two more files come after
    assert example in out, f"expected\n{example}\nin\n{out}"
    assert "5 intact, 0 missing or different" in out
    # the README's quick start shows this run's measurements (the recording is fixed)
    shown = present(re.search(r"^measured: .*$", README.read_text(encoding="utf-8"), re.M))
    assert shown.group(0) in out.splitlines(), f"README shows {shown.group(0)!r}; the demo: {out}"
    pdf = tmp_path / Path(present(re.search(r"report \(PDF\): (\S+)", out)).group(1))
    assert pdf.read_bytes().startswith(b"%PDF")
    assert not (tmp_path / "demo" / "board-tty").exists(), "the simulator's link was left behind"
