"""A year on a Pi: one more capture and sync after a year of history, against day one.

Two state folders are measured side by side in one run:
- empty: no outbox, no records, an empty REPORTS_DIR (the unit's first day);
- year: what the agent holds after a year of BENCH_YEAR_N (10,000) delivered captures and
  BENCH_YEAR_N reports dropped in REPORTS_DIR, with RETENTION_DAYS=30 applied as the code
  applies it: captures delivered before the cutoff are pruned from disk (their rows folded
  into the `daily` counts by outbox.items.compact), the last 30 days' package folders are on disk
  with their delivered rows, every report keeps its newest delivered row (compaction keeps
  it for If-Match) and its content hash in `file_hashes`, every package its `packages` row.

The year state is built once, fast, by direct SQLite inserts into the schema the real Outbox
creates (the Outbox opens the file first, so tables, indexes and version are the code's own),
with the recent package folders hard-linked from one package built by build_package, and the
reports written as small distinct PDFs whose mtimes spread over the year. The hash cache rows
carry each file's real size, mtime_ns and inode, so a pass that re-hashed would show.

Each round, for each state (round-robin, bench/_common.interleaved), two child processes:
1. capture: the capture path on a recorded 10 s Record (measure_once, then
   package_and_decide: JSON, PDF, DICOM, manifest, outbox rows), as the service runs it
   after the board's 10 s, in a fresh interpreter;
2. `device-agent sync --once` against moto's real HTTP S3 server on 127.0.0.1 (a
   ThreadedMotoServer in this process), delivering that package: finders (10,000 reports
   looked at), drain, upload_log.json, housekeeping (prune, compact) as the first pass of a
   process runs it.
Each child's CPU (user+sys) and peak RSS (ru_maxrss) come from os.wait4. Each state grows by
one capture per round (15 rounds: the empty state ends with 16 captures). Ratios here are
year / empty (a cost, so the aim is <= 1.2x). `python bench/bench_year.py` prints the table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from device_agent.core.record import Record

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import interleaved, machine, print_rows, reported, verdict  # noqa: E402

N = int(os.environ.get("BENCH_YEAR_N", "10000"))  # captures and reports; smaller to try out
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "15"))
RETENTION_DAYS = 30
AIM = 1.2
YEAR_S = 365 * 86400.0
PATIENT = {"first_name": "Bench", "last_name": "Synthetic", "age": 59, "gender": "Female"}
_S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}


# --- the states ------------------------------------------------------------------------------

def write_env(home: Path, endpoint: str, bucket: str) -> Path:
    """home/agent.env: the settings both children read (state, reports, moto's endpoint)."""
    env = home / "agent.env"
    (home / "reports").mkdir(parents=True, exist_ok=True)
    env.write_text("\n".join([
        f"STATE_DIR={home / 'state'}", f"REPORTS_DIR={home / 'reports'}",
        f"USERS_FILE={home / 'users.json'}", f"ECG_SERIAL_PORT={home / 'ttyNONE'}",
        f"AWS_S3_BUCKET={bucket}", "AWS_S3_REGION=us-east-1",
        f"AWS_ENDPOINT_URL_S3={endpoint}", "S3_MAX_ATTEMPTS=2", "DISK_RESERVE_MB=0",
        f"RETENTION_DAYS={RETENTION_DAYS}", "CLOCK_CHECK=floor", "DEVICE_SERIAL=BENCH-0001",
        "LOG_LEVEL=warning", "",
    ]))
    return env


def _template_package(work: Path) -> list[tuple[str, str, bytes]]:
    """(kind, name suffix after the stamp, bytes) of one real package built by the library."""
    from device_agent.capture import PackageEncoders, measure_once
    from device_agent.core.config import load_settings
    from device_agent.documents.package import build_package

    settings = load_settings(environ={}, overrides={"STATE_DIR": str(work / "s"),
                                                    "CLOCK_CHECK": "floor"})
    record = measure_once(bench_record(), mains_hz=settings.mains_hz)
    info = build_package(record, PATIENT, work / "tpl", device_serial="BENCH-0001",
                         encoders=PackageEncoders(settings))
    return [(f.kind, f.name.replace(info.stamp, "{stamp}"), f.path.read_bytes())
            for f in info.all_files]


def _pdf(i: int) -> bytes:
    """A small, valid, distinct PDF (a dropped report)."""
    text = f"BT /F1 12 Tf 72 720 Td (report {i}) Tj ET".encode()
    head = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
            b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
            b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]/Contents 4 0 R>>endobj\n")
    return (head + b"4 0 obj<</Length " + str(len(text)).encode() + b">>stream\n" + text
            + b"\nendstream endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n")


@dataclass
class YearCounts:
    """What the built year state holds (for the note)."""

    rows: int
    folders: int
    compacted: int
    reports: int


def build_year_state(home: Path, n: int, *, now: float) -> YearCounts:
    """A year of `n` delivered captures and `n` known reports under home (see the docstring)."""
    from device_agent.core import s3keys
    from device_agent.shipping.outbox import DB_NAME, Outbox

    state, reports = home / "state", (home / "reports").resolve()
    records = (state / "records").resolve()
    records.mkdir(parents=True)
    Outbox(state / DB_NAME).close()  # the code's own schema, indexes and version
    template = _template_package(home / "template")
    meta = {kind: (len(body), hashlib.sha256(body).hexdigest(),
                   '"' + hashlib.md5(body, usedforsecurity=False).hexdigest() + '"')
            for kind, _, body in template}
    blobs = home / "template" / "blobs"
    blobs.mkdir(parents=True)
    for kind, _, body in template:
        (blobs / kind).write_bytes(body)
    cutoff = now - RETENTION_DAYS * 86400
    items: list[tuple[Any, ...]] = []
    packages: list[tuple[Any, ...]] = []
    daily: dict[str, int] = {}
    folders = 0
    for i in range(n):
        at = now - YEAR_S + (i + 0.5) * YEAR_S / n
        when = datetime.fromtimestamp(at).astimezone()
        stamp, prefix = s3keys.stamp(when), s3keys.date_prefix(when)
        folder = records / stamp
        record_id = str(uuid.UUID(int=i + 1))
        packages.append((str(folder), stamp, record_id, "queued", None, None, at))
        delivered_at = at + 5.0
        if delivered_at < cutoff:  # pruned by retention, then compacted into `daily`
            day = datetime.fromtimestamp(delivered_at, UTC).date().isoformat()
            daily[day] = daily.get(day, 0) + len(template)
            continue
        folder.mkdir()
        folders += 1
        (folder / "disposition.json").write_bytes(b'{"disposition": "queued", "reason": null}')
        for kind, pattern, _ in template:
            name = pattern.format(stamp=stamp)
            os.link(blobs / kind, folder / name)
            size, sha, etag = meta[kind]
            key = s3keys.package_key(prefix, stamp, name)
            items.append((kind, "package", str(folder / name), key, sha, size,
                          s3keys.content_type(name), "delivered", 1, 0.0, etag, key, "created",
                          str(folder), record_id, "BENCH-0001", at, delivered_at, delivered_at))
    hashes = []
    for j in range(n):
        name = f"Report_{j:05d}.pdf"
        path = reports / name
        body = _pdf(j)
        path.write_bytes(body)
        at = now - YEAR_S + (j + 0.5) * YEAR_S / n
        os.utime(path, (at, at))
        st = os.lstat(path)
        sha = hashlib.sha256(body).hexdigest()
        key = s3keys.report_key(name, datetime.fromtimestamp(st.st_mtime).astimezone())
        etag = '"' + hashlib.md5(body, usedforsecurity=False).hexdigest() + '"'
        items.append(("ecg_report_pdf", "report", str(path), key, sha, len(body),
                      "application/pdf", "delivered", 1, 0.0, etag, key, "created", None, None,
                      None, at + 15, at + 15, at + 15))
        hashes.append((str(path), st.st_size, st.st_mtime_ns, st.st_ino, sha))
    items.sort(key=lambda r: r[16])  # rowids in the order they were created
    db = sqlite3.connect(state / DB_NAME)
    with db:
        db.executemany(
            "INSERT INTO items (kind, source, path, key, sha256, size, content_type, state, "
            "attempts, next_attempt_at, etag, final_key, outcome, package, record_id, "
            "device_serial, created_at, updated_at, delivered_at) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", items)
        db.executemany("INSERT INTO packages (folder, stamp, record_id, disposition, reason, "
                       "verdict, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)", packages)
        db.executemany("INSERT INTO file_hashes (path, size, mtime_ns, ino, sha256) "
                       "VALUES (?, ?, ?, ?, ?)", hashes)
        db.executemany("INSERT INTO daily (day, delivered) VALUES (?, ?)", sorted(daily.items()))
        db.execute("UPDATE meta SET value = ? WHERE key = 'created_at'",
                   (repr(now - YEAR_S - 86400),))
    db.close()
    shutil.rmtree(home / "template")
    return YearCounts(len(items), folders, sum(daily.values()), n)


# --- the children ----------------------------------------------------------------------------

def bench_record() -> Record:
    """A recorded 10 s 12-lead Record (HR06000), stamped now with a fresh id."""
    from bench_json import real_record

    return replace(real_record(), record_id=str(uuid.uuid4()),
                   acquired_at=datetime.now().astimezone())


def _capture_child(env_file: str) -> None:
    """One capture as the service makes it after the board's 10 s: measure, package, queue."""
    from device_agent.capture import measure_once, package_and_decide
    from device_agent.core.config import load_settings
    from device_agent.shipping.outbox import Outbox

    settings = load_settings(env_file=env_file, environ={})
    record = measure_once(bench_record(), mains_hz=settings.mains_hz)
    with Outbox.open(settings) as outbox:
        outcome = package_and_decide(record, PATIENT, settings, outbox,
                                     out_root=Path(settings.state_dir) / "records",
                                     withheld=False)
    if not outcome.queued:
        raise SystemExit(f"capture not queued: {outcome.disposition}")


def _launcher() -> None:
    """Run the children asked for on stdin (JSON argv per line); answer CPU s and peak RSS.

    The children are started from this small process, not from the benchmark's: Linux keeps
    the larger of a process's peak RSS before and after exec in ru_maxrss, so a child forked
    from the parent (moto, boto3: ~140 MiB) would report at least the parent's size.
    """
    env = dict(os.environ)
    for line in sys.stdin:
        argv = json.loads(line)
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = code = os.waitstatus_to_exitcode(status)
            err.seek(0)
            tail = err.read().decode(errors="replace")[-2000:] if code else ""
        print(json.dumps({"cpu_s": usage.ru_utime + usage.ru_stime,
                          "maxrss_kib": usage.ru_maxrss, "code": code, "stderr": tail}),
              flush=True)


class Launcher:
    """The parent's end of _launcher: one child at a time, its CPU and peak RSS."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "launcher"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def usage(self, argv: list[str]) -> tuple[float, int]:
        """CPU seconds (user + sys) and peak RSS (KiB) of one child, from os.wait4."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(argv) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        if answer["code"] != 0:
            raise RuntimeError(f"{argv[-2:]} exited {answer['code']}: {answer['stderr']}")
        return answer["cpu_s"], answer["maxrss_kib"]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# --- the benchmark ---------------------------------------------------------------------------

def run(n: int = N, rounds: int = ROUNDS) -> list[dict[str, Any]]:
    """Rows: CPU and peak RSS of capture and of `sync --once`, year state / empty state."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    tmp = Path(tempfile.mkdtemp(prefix="bench_year_"))
    launcher = None
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("AWS_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        env.update(_S3_ENV)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "bench")])
        launcher = Launcher(env)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        homes = {"empty": tmp / "empty", "year": tmp / "year"}
        envs = {}
        for name, home in homes.items():
            s3.create_bucket(Bucket=f"bench-{name}")
            envs[name] = write_env(home, endpoint, f"bench-{name}")
        started = time.monotonic()
        built = build_year_state(homes["year"], n, now=time.time())
        build_s = time.monotonic() - started
        rss: dict[str, dict[str, list[int]]] = {s: {"capture": [], "sync": []} for s in homes}
        cpu: dict[str, dict[str, list[float]]] = {s: {"capture": [], "sync": []} for s in homes}

        def contestant(state: str) -> Callable[[], float]:
            def one() -> float:
                total = 0.0
                for step, argv in (
                    ("capture", [sys.executable, __file__, "capture", str(envs[state])]),
                    ("sync", [sys.executable, "-m", "device_agent", "--env-file",
                              str(envs[state]), "sync", "--once"]),
                ):
                    c, r = launcher.usage(argv)
                    cpu[state][step].append(c)
                    rss[state][step].append(r)
                    total += c
                return total

            return one

        totals = interleaved({s: contestant(s) for s in homes}, rounds=rounds,
                             measure=reported)
        left = s3.list_objects_v2(Bucket="bench-year").get("KeyCount", 0)
        if left != 5 * (rounds + 1):
            raise RuntimeError(f"the year state's bucket holds {left} objects, expected "
                               f"{5 * (rounds + 1)}: sync did not deliver every capture")
    finally:
        if launcher is not None:
            launcher.close()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    def med(values: list[float] | list[int]) -> float:
        return float(statistics.median(values[1:]))  # the first call is the warm-up

    state_note = (f"year = {n:,} captures ({built.folders} in the last {RETENTION_DAYS} days on "
                  f"disk, {built.compacted:,} rows compacted into daily counts) + {n:,} reports "
                  f"known in the hash cache, {built.rows:,} outbox rows; built in {build_s:.0f} s "
                  f"by direct SQLite inserts into the Outbox's own schema")
    rows: list[dict[str, Any]] = []

    def row(metric: str, year: float, empty: float, unit_note: str) -> None:
        ratio = year / empty
        rows.append({"benchmark": "year", "metric": metric, "value": round(year, 3),
                     "baseline": round(empty, 3), "ratio": round(ratio, 2),
                     "note": f"{verdict(ratio, at_most=AIM)}; {unit_note}"})

    common = (f"median of {rounds}, round-robin, child processes (started from a small "
              f"launcher) measured by os.wait4; "
              f"baseline = the same on an empty state")
    total = {s: med(totals[s]) for s in homes}
    row("capture + sync --once CPU s (year / empty)", total["year"], total["empty"],
        f"{common}; {state_note}; {machine()}")
    for step, label in (("capture", "capture (measure, package, queue) CPU s"),
                        ("sync", "sync --once subprocess CPU s")):
        row(f"{label} (year / empty)", med(cpu["year"][step]), med(cpu["empty"][step]), common)
    for step, label in (("capture", "capture peak RSS MiB"),
                        ("sync", "sync --once peak RSS MiB")):
        row(f"{label} (year / empty)", med(rss["year"][step]) / 1024,
            med(rss["empty"][step]) / 1024, common + "; ru_maxrss of the child")
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "capture":
        _capture_child(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "launcher":
        _launcher()
    else:
        print(f"Machine: {machine()}")
        print_rows(run())
