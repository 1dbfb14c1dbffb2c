"""Whole-pipeline cost per 10 s record, and the service's steady-state memory.

CPU: decode 10 s of board frames (fed as the reader feeds them, ~50 ms per read), build the
record, detect QRS, write ecg_data JSON, render the PDF, write patient details and the
manifest with SHA-256 and fsync'd atomic writes, and commit the outbox rows. Measured as
process CPU time (time.process_time, all threads), median of repeats, as a share of the
record's own 10 s: the budget is 2 %.

Memory: `device-agent run` as a real subprocess with the unit's Environment= settings,
reading a simulated board on a pty and uploading to moto's HTTP server on 127.0.0.1, after
each of ten captures handed to it through the spool and uploaded; its VmRSS is compared
with a bare interpreter that imports the same libraries.
"""

from __future__ import annotations

import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import print_rows  # noqa: E402

from device_agent.config import load_settings  # noqa: E402
from device_agent.lab.demo import default_record  # noqa: E402

REPEATS = 9
PATIENT = {"first_name": "Bench", "last_name": "Synthetic", "age": 50, "gender": "Female"}
CAPTURES = 10
SPEED = 5.0  # the simulated board streams 5x real time so ten captures take ~20 s
UNIT = ROOT / "systemd" / "device-agent.service"


def unit_environment(unit: Path = UNIT) -> dict[str, str]:
    """The Environment= settings of the systemd unit: the service is measured as deployed."""
    env = {}
    for line in unit.read_text().splitlines():
        if line.startswith("Environment="):
            key, _, value = line.removeprefix("Environment=").partition("=")
            env[key] = value
    return env
RSS_BUDGET_MB = 80.0


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
    from device_agent.framing import FrameDecoder, Frames
    from device_agent.outbox import Outbox
    from device_agent.package import build_package
    from device_agent.port import READ_CHUNK
    from device_agent.record import DeviceInfo, build_record

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
        outbox.add_package(info)
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


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _baseline_rss_mb() -> float:
    code = ("import boto3, numpy, reportlab.pdfgen.canvas, serial, sqlite3, sys;"
            "boto3.session.Session().client('s3', region_name='us-east-1');"
            "sys.stdout.write('ready\\n'); sys.stdout.flush(); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        return _rss_mb(proc.pid)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def _wait_until_serving(state_dir: Path, service: subprocess.Popen, timeout: float = 60) -> None:
    """Until the service's status file says the board is connected (bounded)."""
    from device_agent.status import read_status_file

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.poll() is not None:
            raise RuntimeError(f"device-agent run exited with {service.returncode}")
        doc = read_status_file(state_dir) or {}
        if (doc.get("port") or {}).get("connected"):
            return
        time.sleep(0.1)
    raise RuntimeError("device-agent run did not connect to the simulated board in time")


def _wait_until_drained(state_dir: Path, timeout: float = 60) -> None:
    """Until the service has uploaded everything queued (bounded)."""
    from device_agent.status import outbox_summary

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if outbox_summary(state_dir, now=time.time())["pending"] == 0:
            return
        time.sleep(0.1)
    raise RuntimeError("the service did not drain its outbox in time")


def rss_rows() -> list[dict]:
    import boto3
    from moto.server import ThreadedMotoServer

    from device_agent.lab.simulator import BoardSimulator

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="b",
                 aws_secret_access_key="b").create_bucket(Bucket="bench")
    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp) / "board"
        env = {**os.environ, "ECG_SERIAL_PORT": str(link), "STATE_DIR": f"{tmp}/state",
               "REPORTS_DIR": f"{tmp}/reports", "USERS_FILE": f"{tmp}/users.json",
               "AWS_ENDPOINT_URL_S3": endpoint, "AWS_S3_BUCKET": "bench",
               "AWS_S3_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "b",
               "AWS_SECRET_ACCESS_KEY": "b", "ECG_COUNTS_PER_MV": "500", "CLOCK_CHECK": "floor",
               "SYNC_INTERVAL_S": "2", "DISK_RESERVE_MB": "0", "DEVICE_SERIAL": "BENCH-1"}
        Path(tmp, "none").write_text("")  # the settings come from the environment
        cli = [sys.executable, "-m", "device_agent", "--env-file", f"{tmp}/none"]
        env.update(unit_environment())
        with BoardSimulator(default_record(), link, counts_per_mv=500, speed=SPEED, loop=True):
            service = subprocess.Popen([*cli, "run"], env=env, cwd=tmp,
                                       stderr=subprocess.DEVNULL)
            try:
                _wait_until_serving(Path(tmp) / "state", service)
                samples = []
                for _ in range(CAPTURES):
                    subprocess.run([*cli, "capture"], env=env, cwd=tmp, check=True,
                                   capture_output=True, timeout=120)
                    _wait_until_drained(Path(tmp) / "state")
                    samples.append(_rss_mb(service.pid))
                rss = samples[-1]
            finally:
                service.terminate()
                service.wait(timeout=30)
    server.stop()
    base = _baseline_rss_mb()
    return [{
        "benchmark": "service memory", "metric": "steady-state RSS of `device-agent run` "
        f"after {CAPTURES} captures, all uploaded (unit's Environment=)", "value": f"{rss:.1f} MB",
        "baseline": f"{base:.1f} MB (python + boto3, numpy, reportlab, pyserial imported)",
        "ratio": f"{rss / base:.2f}x",
        "note": f"budget {RSS_BUDGET_MB:.0f} MB; RSS after each capture: "
        + ", ".join(f"{s:.1f}" for s in samples) + " MB",
    }]


def run() -> list[dict]:
    return pipeline_rows() + rss_rows()


if __name__ == "__main__":
    print_rows(run())
