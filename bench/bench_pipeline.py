"""Whole-pipeline cost per 10 s record.

CPU: decode 10 s of board frames (fed as the reader feeds them, ~50 ms per read), build the
record, detect QRS, write ecg_data JSON, render the PDF, write patient details and the
manifest with SHA-256 and fsync'd atomic writes, and commit the outbox rows. Measured as
process CPU time (time.process_time, all threads), median of repeats, as a share of the
record's own 10 s: the budget is 2 %.

The service's memory and idle CPU are bench_service.py's.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import print_rows  # noqa: E402

from device_agent.core.config import load_settings  # noqa: E402
from device_agent.lab.demo import default_record  # noqa: E402

REPEATS = 15
PATIENT = {"first_name": "Bench", "last_name": "Synthetic", "age": 50, "gender": "Female"}


def _frames_bytes(settings) -> bytes:
    import numpy as np

    from device_agent.lab.simulator import encode_frames, record_counts

    counts = record_counts(default_record(), settings.counts_per_mv)[:5000]
    frames = encode_frames(counts, np.arange(len(counts)) & 0x3F, byte_order=settings.byte_order)
    return frames.tobytes()


def _one_record(settings, data: bytes, out: Path) -> float:
    """CPU seconds for one record through the whole on-device pipeline."""
    from datetime import datetime

    from device_agent.capture import PackageEncoders, measure_once
    from device_agent.core.record import DeviceInfo, build_record
    from device_agent.documents.package import build_package
    from device_agent.link.framing import FrameDecoder, Frames
    from device_agent.link.port import READ_CHUNK
    from device_agent.shipping.outbox import Outbox

    started = time.process_time()
    decoder = FrameDecoder(byte_order=settings.byte_order, sampling_rate=settings.sampling_rate)
    batches = [decoder.feed(data[i:i + READ_CHUNK]) for i in range(0, len(data), READ_CHUNK)]
    frames = Frames.concat([b for b in batches if len(b)])
    record = build_record(frames.position, frames.counts, frames.electrodes, n_samples=5000,
                          acquired_at=datetime.now().astimezone(), settings=settings,
                          device=DeviceInfo(settings.device_serial, settings.device_model))
    record = measure_once(record, mains_hz=settings.mains_hz)
    info = build_package(record, PATIENT, out, device_serial=settings.device_serial,
                         encoders=PackageEncoders(settings))
    with Outbox.open(settings) as outbox:
        outbox.packages.add(info)
    return time.process_time() - started


def pipeline_rows() -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(env_file=None, environ={}).replace(
            state_dir=Path(tmp) / "state", counts_per_mv=500.0, device_serial="BENCH-1")
        data = _frames_bytes(settings)
        _one_record(settings, data, Path(tmp) / "warm")  # imports and caches
        costs = [_one_record(settings, data, Path(tmp) / f"r{i}") for i in range(REPEATS)]
    cpu = statistics.median(costs)
    return [{
        "benchmark": "pipeline", "metric": "CPU per 10 s record (decode+record+QRS+JSON+PDF"
        "+SHA-256+fsync writes+outbox)", "value": f"{cpu * 1000:.0f} ms",
        "baseline": "10 s record", "ratio": f"{100 * cpu / 10.0:.2f} % of real time",
        "note": f"budget 2 %; median of {REPEATS}",
    }]


def run() -> list[dict]:
    return pipeline_rows()


if __name__ == "__main__":
    print_rows(run())
