"""The whole idle service on a Pi: its CPU against a bare read loop, its memory against a bare
interpreter, and whether its memory stays flat over 200 captures.

1. Idle CPU. Two board simulators stream the same recording at the board's real rate
   (500 frames/s) into two ptys, each from a process of its own (bench_reader.py's feeder).
   On one runs `device-agent run` (reader, sync loop against moto's real HTTP S3 server on
   127.0.0.1, status and spool loop); on the other the floor any reader of this link pays:
   os.read of the pty then time.sleep(0.1), nothing else. Each runs under a probe: a thread
   blocked on a pipe that, when asked, answers getrusage(RUSAGE_SELF) (all threads, ns
   precision; /proc's 10 ms ticks are too coarse for a loop that spends ~1 ms a second).
   Both run all the time and are sampled over the same windows (WINDOW_S each, ROUNDS of
   them, in an order shuffled each round): the round-robin is the machine's own, so a slow
   spell falls on both alike. SYNC_INTERVAL_S is WINDOW_S, so every window holds a sync
   pass (the default of 15 s makes the service cheaper than measured here). Before the
   windows the service makes CAPTURES captures handed over by `device-agent capture` (the
   spool, as an operator's would), delivered to the bucket, so what is measured is the
   service after work, not fresh from start.
2. Memory. The service's VmRSS over the same windows (median) against a bare interpreter
   that imports boto3, numpy, reportlab, pydicom, serial and the device_agent modules the
   service loads, and makes one boto3 S3 client; measured alongside. And against issue
   26's baseline, a bare interpreter with boto3, numpy and reportlab alone (one client):
   the service after its captures, and just after READY=1 before any capture (what being
   up costs; the capture path's libraries load with the first capture). Every process here
   runs with the systemd unit's Environment= (its malloc settings), as the service is deployed,
   and on the interpreter of a venv holding the runtime dependencies alone (.venv-run, which
   `make bench` builds; BENCH_DEPLOYED_PYTHON): the test venv's requests, which pydicom
   imports when it is there, is about 4 MB a unit never holds.
3. Flat memory. In a child process, the capture path (measure_once, package_and_decide:
   JSON, PDF, DICOM, manifest, outbox rows) run FLAT_CAPTURES times on a recorded 10 s
   Record; VmRSS after capture 6 and after the last. (The service takes 10 s of board data
   per capture; calling the same path in one process is how 200 captures fit in a bench.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import MIN_ROUNDS, machine, print_rows, unit_environment, verdict  # noqa: E402

ROUNDS = max(int(os.environ.get("BENCH_ROUNDS", "15")), MIN_ROUNDS)
WINDOW_S = 3.0
CAPTURES = 3            # through the running service, before the windows
CAPTURE_SECONDS = 2     # of board data each (ECG_CAPTURE_SECONDS; 10 by default)
FLAT_CAPTURES = int(os.environ.get("BENCH_FLAT_CAPTURES", "200"))
FLAT_FROM = 6
CPU_AIM, RSS_AIM, LIBS_RSS_AIM, FLAT_AIM_KIB = 3.0, 1.10, 1.15, 1024
READER = ROOT / "bench" / "bench_reader.py"
# The interpreter of a venv holding the runtime dependencies alone, as systemd/install.sh
# deploys them (`make bench` builds .venv-run). The service, the bare loop and the bare
# interpreters run on it: in the test venv pydicom also imports requests (moto's), ~4 MB
# a unit never holds. Without it they run on this interpreter, and the rows say so.
DEPLOYED = os.environ.get("BENCH_DEPLOYED_PYTHON", "")
PYTHON = DEPLOYED or sys.executable
WHERE = ("on the deployed set of libraries (.venv-run: the runtime dependencies alone)"
         if DEPLOYED else "on the bench venv (its test tools make pydicom import requests: "
         "BENCH_DEPLOYED_PYTHON for the deployed set)")
_S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
# what the bare interpreter imports: the service's libraries and its own modules
BARE_IMPORTS = ("boto3", "numpy", "reportlab.pdfgen.canvas", "pydicom", "serial",
                "device_agent.commands", "device_agent.commands.service",
                "device_agent.commands.capture", "device_agent.service", "device_agent.sync",
                "device_agent.shipping.drain", "device_agent.shipping.uploader",
                "device_agent.capture", "device_agent.documents.pdf",
                "device_agent.documents.dicom", "device_agent.documents.ecgdata",
                "device_agent.clinical.measurements", "device_agent.documents.package",
                "device_agent.link.port", "device_agent.ops.spool", "device_agent.ops.notify",
                "device_agent.ops.status")
# issue 26's baseline: a bare interpreter with the three big libraries alone (and one client)
LIBS_IMPORTS = ("boto3", "numpy", "reportlab.pdfgen.canvas")


# --- the probe: run something, answer getrusage on request ----------------------------------

def _probe(answer_fd: int) -> None:
    """Answer each line on stdin with this process's CPU seconds (all threads) on answer_fd."""
    out = os.fdopen(answer_fd, "w", buffering=1)

    def serve() -> None:
        for _ in sys.stdin:
            r = resource.getrusage(resource.RUSAGE_SELF)
            out.write(json.dumps({"cpu_s": r.ru_utime + r.ru_stime}) + "\n")

    threading.Thread(target=serve, name="bench-probe", daemon=True).start()


def _run_service(answer_fd: int, env_file: str) -> int:
    """`device-agent --env-file ENV run`, under the probe."""
    from device_agent.commands import main

    _probe(answer_fd)
    return main(["--env-file", env_file, "run"])


def _run_bare_loop(answer_fd: int, link: str) -> None:
    """The floor: os.read of the pty, then sleep(0.1), until SIGTERM; under the probe."""
    _probe(answer_fd)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    fd = os.open(link, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    while not stop.is_set():
        with contextlib.suppress(BlockingIOError):
            os.read(fd, 65536)
        time.sleep(0.1)


def _bare_imports(names: tuple[str, ...] = BARE_IMPORTS) -> None:
    """A bare interpreter with these imports and one S3 client, idle until stdin ends."""
    import importlib

    for name in names:
        importlib.import_module(name)
    import boto3

    boto3.client("s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:9")
    print("ready", flush=True)
    sys.stdin.read()


class Probed:
    """A child run under _probe: ask its CPU seconds; read its RSS from /proc."""

    def __init__(self, argv: list[str], env: dict[str, str], **kw: object) -> None:
        read_fd, write_fd = os.pipe()
        self.proc = subprocess.Popen([*argv, str(write_fd)], env=env, stdin=subprocess.PIPE,
                                     pass_fds=(write_fd,), text=True, **kw)  # type: ignore
        os.close(write_fd)
        self.answers = os.fdopen(read_fd)

    def cpu_s(self) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        line = self.answers.readline()
        if not line:
            raise RuntimeError(f"{self.proc.args} ended (exit {self.proc.poll()})")
        return float(json.loads(line)["cpu_s"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.answers.close()


def rss_kib(pid: int) -> int:
    """VmRSS of a process (KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


# --- flat memory over many captures ---------------------------------------------------------

def _flat_child(state: str, captures: int) -> None:
    """The capture path `captures` times in this process; print VmRSS after each (KiB)."""
    import dataclasses
    import uuid
    from datetime import datetime

    from bench_json import real_record

    from device_agent.capture import measure_once, package_and_decide
    from device_agent.core.config import load_settings
    from device_agent.shipping.outbox import Outbox

    settings = load_settings(environ={}, overrides={
        "STATE_DIR": state, "CLOCK_CHECK": "floor", "DEVICE_SERIAL": "BENCH-0001",
        "DISK_RESERVE_MB": "0"})
    base = real_record()
    patient = {"first_name": "Bench", "last_name": "Synthetic", "age": 59, "gender": "Female"}
    rss = []
    with Outbox.open(settings) as outbox:
        for _ in range(captures):
            record = dataclasses.replace(base, record_id=str(uuid.uuid4()),
                                         acquired_at=datetime.now().astimezone())
            record = measure_once(record, mains_hz=settings.mains_hz)
            outcome = package_and_decide(record, patient, settings, outbox,
                                         out_root=Path(state) / "records", withheld=False)
            shutil.rmtree(outcome.folder)  # the disk is not what is measured
            rss.append(rss_kib(os.getpid()))
    print(json.dumps(rss))


def flat_rows(tmp: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """VmRSS growth from capture FLAT_FROM to FLAT_CAPTURES of the capture path, in one process."""
    out = subprocess.run([PYTHON, __file__, "flat", str(tmp / "flat"),
                          str(FLAT_CAPTURES)], env=env, capture_output=True, text=True,
                         check=True, timeout=1200)
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    # each point is the median of 5 captures' VmRSS (from it on, up to it), so that when
    # glibc happens to return free heap to the OS does not decide the row
    at = int(statistics.median(rss[FLAT_FROM - 1:FLAT_FROM + 4]))
    end = int(statistics.median(rss[-5:]))
    growth = end - at
    return [{
        "benchmark": "service", "metric": f"RSS growth KiB, capture {FLAT_FROM} to "
                                          f"{len(rss)} (capture path in one process)",
        "value": growth, "baseline": at, "ratio": round(end / at, 3),
        "note": (f"aim < {FLAT_AIM_KIB} KiB growth: "
                 f"{'met' if growth < FLAT_AIM_KIB else 'NOT met'}; baseline = VmRSS (KiB) "
                 f"after capture {FLAT_FROM} (median of captures {FLAT_FROM}-{FLAT_FROM + 4}; "
                 f"value: of the last 5); measure_once + package_and_decide (JSON, PDF, "
                 f"DICOM, outbox) on a recorded 10 s record; VmRSS after capture 1 / 50 / 100 / "
                 f"max: {rss[0]} / {rss[min(49, len(rss) - 1)]} / {rss[min(99, len(rss) - 1)]} "
                 f"/ {max(rss)}"),
    }]


# --- the benchmark ---------------------------------------------------------------------------

def run(rounds: int = ROUNDS) -> list[dict[str, Any]]:
    """Rows: idle CPU of the service / a bare read loop; its RSS / a bare interpreter; growth."""
    import boto3
    from moto.server import ThreadedMotoServer

    from device_agent.shipping.outbox import read_only_stats

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    tmp = Path(tempfile.mkdtemp(prefix="bench_service_"))
    children: list[subprocess.Popen[str]] = []
    probed: list[Probed] = []
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing"
                     ).create_bucket(Bucket="bench-service")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("AWS_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC",
                                                          "WATCHDOG_PID")}
        env.update(_S3_ENV)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "bench")])
        env.update(unit_environment())  # as deployed (MALLOC_ARENA_MAX); the bare ones too
        links = {name: str(tmp / f"tty{name}") for name in ("service", "bare")}
        for link in links.values():
            feeder = subprocess.Popen([sys.executable, str(READER), "feed", link],
                                      stdout=subprocess.PIPE, text=True, env=env)
            children.append(feeder)
            if feeder.stdout is None or feeder.stdout.readline().strip() != "ready":
                raise RuntimeError("the board simulator did not start")
        state = tmp / "state"
        env_file = tmp / "agent.env"
        env_file.write_text("\n".join([
            f"STATE_DIR={state}", f"REPORTS_DIR={tmp / 'reports'}",
            f"USERS_FILE={tmp / 'users.json'}", f"ECG_SERIAL_PORT={links['service']}",
            "ECG_COUNTS_PER_MV=400", f"ECG_CAPTURE_SECONDS={CAPTURE_SECONDS}",
            f"SYNC_INTERVAL_S={WINDOW_S:g}", "AWS_S3_BUCKET=bench-service",
            "AWS_S3_REGION=us-east-1", f"AWS_ENDPOINT_URL_S3={endpoint}", "DISK_RESERVE_MB=0",
            "CLOCK_CHECK=floor", "DEVICE_SERIAL=BENCH-0001", "LOG_LEVEL=warning", "",
        ]))
        sock_path = str(tmp / "notify.sock")
        sock.bind(sock_path)
        sock.settimeout(0.2)
        service_env = {**env, "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "30000000"}
        service = Probed([PYTHON, __file__, "service", str(env_file)], service_env,
                         cwd=tmp, stdout=subprocess.DEVNULL)
        probed.append(service)
        ready: list[str] = []

        def is_ready() -> bool:
            with contextlib.suppress(TimeoutError, BlockingIOError):
                ready.append(sock.recv(4096).decode())
            return any(m.startswith("READY=1") for m in ready)

        _until(is_ready, 60, "READY=1 from the service")
        fresh: list[int] = []  # before any capture: what the service holds for being up
        for _ in range(5):
            time.sleep(0.5)
            fresh.append(rss_kib(service.proc.pid))
        cli = [PYTHON, "-m", "device_agent", "--env-file", str(env_file)]
        for _ in range(CAPTURES):
            subprocess.run([*cli, "capture"], env=env, cwd=tmp, check=True, timeout=120,
                           capture_output=True)

        def delivered() -> bool:
            stats = read_only_stats(state)
            return stats is not None and stats.pending == 0 and stats.delivered >= 5 * CAPTURES

        _until(delivered, 120, f"{CAPTURES} captures delivered to the bucket")
        bare = Probed([PYTHON, __file__, "bare-loop", links["bare"]], env)
        probed.append(bare)
        imports = subprocess.Popen([PYTHON, __file__, "bare-imports"], env=env,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        children.append(imports)
        libs = subprocess.Popen([PYTHON, __file__, "bare-libs"], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        children.append(libs)
        for bare_process in (imports, libs):
            if bare_process.stdout is None or bare_process.stdout.readline().strip() != "ready":
                raise RuntimeError("the bare interpreter did not start")
        time.sleep(WINDOW_S)  # settle: the bare loop drains the backlog its pty held
        contestants = {"service": service, "bare": bare}
        cpu: dict[str, list[float]] = {name: [] for name in contestants}
        rss: dict[str, list[int]] = {"service": [], "bare-imports": [], "bare-libs": []}
        order = list(contestants)
        shuffle = random.Random(0).shuffle
        last = {name: p.cpu_s() for name, p in contestants.items()}
        for _ in range(rounds):
            time.sleep(WINDOW_S)
            shuffle(order)
            for name in order:
                now = contestants[name].cpu_s()
                cpu[name].append((now - last[name]) / WINDOW_S)
                last[name] = now
            rss["service"].append(rss_kib(service.proc.pid))
            rss["bare-imports"].append(rss_kib(imports.pid))
            rss["bare-libs"].append(rss_kib(libs.pid))
        if service.proc.poll() is not None:
            raise RuntimeError(f"the service exited ({service.proc.returncode})")
        rows: list[dict[str, Any]] = []
        ours, base = statistics.median(cpu["service"]), statistics.median(cpu["bare"])
        ratio = ours / base
        rows.append({
            "benchmark": "service",
            "metric": "idle CPU ms per s, device-agent run (vs a bare pty read loop, 10/s)",
            "value": round(ours * 1000, 2), "baseline": round(base * 1000, 2),
            "ratio": round(ratio, 2),
            "note": (f"{verdict(ratio, at_most=CPU_AIM)} (ratio = service / bare); median of "
                     f"{rounds} windows of {WINDOW_S:g} s, both running throughout on their own "
                     f"pty fed at 500 frames/s, sampled in shuffled order; getrusage of each "
                     f"process (all threads); a sync pass against moto every window, after "
                     f"{CAPTURES} captures through the spool; {machine()}"),
        })
        ours_kib = statistics.median(rss["service"])
        base_kib = statistics.median(rss["bare-imports"])
        ratio = ours_kib / base_kib
        rows.append({
            "benchmark": "service",
            "metric": "steady RSS MiB, device-agent run (vs bare interpreter with its imports)",
            "value": round(ours_kib / 1024, 1), "baseline": round(base_kib / 1024, 1),
            "ratio": round(ratio, 3),
            "note": (f"{verdict(ratio, at_most=RSS_AIM)} (ratio = service / bare); median "
                     f"VmRSS over the same windows; bare = {', '.join(BARE_IMPORTS[:5])} and "
                     f"{len(BARE_IMPORTS) - 5} device_agent modules imported, one boto3 S3 "
                     f"client; service min-max {min(rss['service']) / 1024:.1f}-"
                     f"{max(rss['service']) / 1024:.1f} MiB; {WHERE}"),
        })
        libs_kib = statistics.median(rss["bare-libs"])
        for label, kib, when in (
                ("steady RSS MiB, device-agent run", ours_kib,
                 f"after {CAPTURES} captures, over the windows"),
                ("RSS MiB before the first capture, device-agent run",
                 statistics.median(fresh), "just after READY=1, before any capture")):
            ratio = kib / libs_kib
            rows.append({
                "benchmark": "service",
                "metric": f"{label} (vs bare interpreter with {', '.join(LIBS_IMPORTS)})",
                "value": round(kib / 1024, 1), "baseline": round(libs_kib / 1024, 1),
                "ratio": round(ratio, 3),
                "note": (f"{verdict(ratio, at_most=LIBS_RSS_AIM)} (issue 26's baseline: "
                         f"the three big libraries and one boto3 S3 client, nothing of ours); "
                         f"service VmRSS {when} (median); {WHERE}"),
            })
    finally:
        for p in probed:
            p.stop()
        for child in children:
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait(timeout=10)
        sock.close()
        server.stop()
    try:
        rows.extend(flat_rows(tmp, env))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "service":
        sys.exit(_run_service(int(sys.argv[3]), sys.argv[2]))
    elif command == "bare-loop":
        _run_bare_loop(int(sys.argv[3]), sys.argv[2])
    elif command == "bare-imports":
        _bare_imports()
    elif command == "bare-libs":
        _bare_imports(LIBS_IMPORTS)
    elif command == "flat":
        _flat_child(sys.argv[2], int(sys.argv[3]))
    else:
        print(f"Machine: {machine()}")
        print_rows(run())
