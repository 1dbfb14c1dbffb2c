"""`device-agent sync --once` against `aws s3 sync`: one folder of reports, one moto server.

Both contestants are whole processes started from the shell's point of view (interpreter,
imports, the pass, exit), as an operator or a cron job would run them, on the same folder of
PDF reports (~70 KB each, random bytes behind a %PDF header, named as the unit names them,
their mtimes a minute old so our finder takes them as completely written) and against the
same moto S3 server on 127.0.0.1 (in this process, so its CPU is in neither contestant's):

- ours: `device-agent sync --once` with REPORTS_DIR = the folder, uploads on (3 upload
  threads, the default), every report hashed (SHA-256) and recorded in the outbox's SQLite
  before it is sent, its key ecg-reports/YYYY/MM/DD/<name>;
- aws: `aws s3 sync FOLDER s3://BUCKET/ecg-reports/` (awscli v1 in a venv of its own,
  bench/aws-constraints.txt; 10 concurrent requests, its default), excluding the
  upload_log.json our pass writes into the folder (the legacy app's view), so both send
  exactly the same files.

Cases, like with like:
1. N new reports (50 and 500): a fresh, empty bucket for each call, and for ours a fresh
   STATE_DIR (nothing known), so both send all N. aws lists the empty bucket; ours
   lists the bucket once on a first start (the legacy takeover) and keeps its own state.
2. An unchanged pass: everything already delivered by an earlier call of the same
   contestant. aws learns that from a LIST of the bucket (size + mtime against each file);
   ours from its own state (the outbox knows each file by path, size, mtime and inode) and
   sends no request. Each decides "nothing to send" its own way: that is what is compared.

Measures: wall time from start to exit (what a caller waits for) and CPU time of the child
(os.wait4: user + system, all its threads). Contestants run interleaved round-robin in a
shuffled order (as _common.interleaved does, with wall and CPU kept from each call), medians
of ROUNDS (>= 15) per case; the 500-report case runs ROUNDS_500 (7) rounds: each of its calls
sends 35 MB and deletes them after (about 5 s a round on the 2-core Xeon), and
its per-round ratios spread little (p25-p75 within +-0.03 of the median on the Xeon; each row
prints it), so 15 would add a minute to `make bench` for nothing. The whole bench takes
about 85 s there. Ratio = aws / ours: >= 1.0 means ours is at least as fast.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import MIN_ROUNDS, machine, print_rows, unit_environment  # noqa: E402

ROUNDS = max(int(os.environ.get("BENCH_ROUNDS", "15")), MIN_ROUNDS)
# fewer for the 500-report case (see the docstring); BENCH_ROUNDS_500 to change it
ROUNDS_500 = int(os.environ.get("BENCH_ROUNDS_500", "7"))
REPORT_BYTES = 70 * 1024
AIM = 1.0
# the awscli venv `make bench` builds (bench/aws-constraints.txt); AWS_CLI to use another
AWS_CLI = os.environ.get("AWS_CLI", str(ROOT / ".venv-aws" / "bin" / "aws"))
_S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}


def make_reports(folder: Path, n: int, *, seed: int = 0) -> None:
    """n reports of REPORT_BYTES, named as the unit names them, a minute old."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    old = time.time() - 60
    for i in range(n):
        # ECG_Report_YYYYMMDD_HHMMSS.pdf, one a second from 2026-01-24 10:00:00
        h, rest = divmod(i, 3600)
        m, s = divmod(rest, 60)
        path = folder / f"ECG_Report_20260124_{10 + h:02d}{m:02d}{s:02d}.pdf"
        path.write_bytes(b"%PDF-1.4\n" + rng.randbytes(REPORT_BYTES - 9))
        os.utime(path, (old, old))


def run_child(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """(wall s, CPU s) of one child process run to its end; raise if it failed."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:3]} exited {proc.returncode}: {err.strip()[-500:]}")
    return wall, usage.ru_utime + usage.ru_stime


class Contestants:
    """Buckets, state folders and the two command lines against one moto server."""

    def __init__(self, endpoint: str, tmp: Path, env: dict[str, str]) -> None:
        import boto3

        self.endpoint, self.tmp, self.env = endpoint, tmp, env
        self.s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                               aws_access_key_id="testing", aws_secret_access_key="testing")

    def bucket(self) -> str:
        name = f"bench-sync-{uuid.uuid4().hex[:12]}"
        self.s3.create_bucket(Bucket=name)
        return name

    def drop(self, bucket: str) -> None:
        """Delete a bucket and its objects (moto keeps them in memory)."""
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})
        self.s3.delete_bucket(Bucket=bucket)

    def count(self, bucket: str) -> int:
        paginator = self.s3.get_paginator("list_objects_v2")
        return sum(page.get("KeyCount", 0) for page in paginator.paginate(Bucket=bucket))

    def ours(self, folder: Path, bucket: str, state: Path) -> list[str]:
        values = {"STATE_DIR": state, "REPORTS_DIR": folder, "USERS_FILE": self.tmp / "none.json",
                  "CLOCK_CHECK": "floor", "DISK_RESERVE_MB": "0",
                  "ECG_SERIAL_PORT": self.tmp / "ttyNONE", "CLOUD_UPLOAD_ENABLED": "true",
                  "AWS_S3_BUCKET": bucket, "AWS_S3_REGION": "us-east-1",
                  "AWS_ENDPOINT_URL_S3": self.endpoint, "LOG_LEVEL": "warning"}
        flags = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
        return [sys.executable, "-m", "device_agent", *flags, "sync", "--once"]

    def aws(self, folder: Path, bucket: str) -> list[str]:
        return [AWS_CLI, "s3", "sync", str(folder), f"s3://{bucket}/ecg-reports/",
                "--endpoint-url", self.endpoint, "--exclude", "upload_log.json",
                "--no-progress", "--only-show-errors"]


def _case(name: str, calls: dict[str, Callable[[], tuple[float, float]]], rounds: int,
          ) -> dict[str, dict[str, list[float]]]:
    """Each contestant's (wall, CPU) per round, round-robin in a shuffled order."""
    out: dict[str, dict[str, list[float]]] = {c: {"wall": [], "cpu": []} for c in calls}
    for fn in calls.values():  # warm-up: the page cache, moto's first requests
        fn()
    order = list(calls)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for contestant in order:
            wall, cpu = calls[contestant]()
            out[contestant]["wall"].append(wall)
            out[contestant]["cpu"].append(cpu)
    print(f"  {name}: done", file=sys.stderr, flush=True)
    return out


def _rows(case: str, values: dict[str, dict[str, list[float]]], rounds: int, note: str,
          ) -> list[dict[str, Any]]:
    rows = []
    for measure, label in (("wall", "wall s"), ("cpu", "CPU s")):
        ours = statistics.median(values["ours"][measure])
        aws = statistics.median(values["aws"][measure])
        ratios = sorted(a / o for a, o in zip(values["aws"][measure], values["ours"][measure],
                                              strict=True))
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        ratio = aws / ours
        rows.append({
            "benchmark": "sync",
            "metric": f"{case}: {label}, device-agent sync --once (baseline: aws s3 sync)",
            "value": round(ours, 3), "baseline": round(aws, 3), "ratio": round(ratio, 2),
            "note": (f"aim >= {AIM:g}x: {'met' if ratio >= AIM else 'NOT met'} (ratio = aws / "
                     f"ours; per-round p25-p75 {q1:.2f}-{q3:.2f}); median of {rounds} rounds, "
                     f"interleaved; {note}; {machine()}"),
        })
    return rows


def run(rounds: int = ROUNDS, rounds_500: int = ROUNDS_500) -> list[dict[str, Any]]:
    """Rows: wall and CPU of sync --once / aws s3 sync for 50 new, 500 new, unchanged."""
    if not Path(AWS_CLI).exists():
        raise RuntimeError(f"no aws CLI at {AWS_CLI}: `make bench` installs it "
                           "(bench/aws-constraints.txt)")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    tmp = Path(tempfile.mkdtemp(prefix="bench_sync_"))
    try:
        host, port = server.get_host_and_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(_S3_ENV)
        env.update({"AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
                    "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
                    "PYTHONPATH": str(ROOT)})
        env.update(unit_environment())  # both run as the unit would (MALLOC_ARENA_MAX)
        c = Contestants(f"http://{host}:{port}", tmp, env)
        rows: list[dict[str, Any]] = []
        for n, case_rounds in ((50, rounds), (500, rounds_500)):
            folder = tmp / f"reports-{n}"
            make_reports(folder, n)

            def new(contestant: str, folder: Path = folder, n: int = n,
                    ) -> tuple[float, float]:
                bucket = c.bucket()
                state = tmp / f"state-{uuid.uuid4().hex[:8]}"
                argv = (c.ours(folder, bucket, state) if contestant == "ours"
                        else c.aws(folder, bucket))
                try:
                    measured = run_child(argv, env, tmp)
                    if c.count(bucket) != n:
                        raise RuntimeError(f"{contestant} sent {c.count(bucket)} of {n}")
                    return measured
                finally:
                    c.drop(bucket)
                    shutil.rmtree(state, ignore_errors=True)

            values = _case(f"{n} new", {"ours": lambda: new("ours"), "aws": lambda: new("aws")},
                           case_rounds)
            rows += _rows(f"{n} new ~70 KB reports", values, case_rounds,
                          "a fresh bucket (and STATE_DIR) each call")
            if n == 50:
                # the unchanged pass: each contestant's own bucket, synced once beforehand
                buckets = {"ours": c.bucket(), "aws": c.bucket()}
                state = tmp / "state-unchanged"
                argvs = {"ours": c.ours(folder, buckets["ours"], state),
                         "aws": c.aws(folder, buckets["aws"])}
                for name, argv in argvs.items():
                    run_child(argv, env, tmp)
                    if c.count(buckets[name]) != n:
                        raise RuntimeError(f"{name} did not deliver all {n} before the "
                                           "unchanged pass")
                unchanged = _case("unchanged", {
                    name: (lambda argv=argv: run_child(argv, env, tmp))
                    for name, argv in argvs.items()}, rounds)
                for name, bucket in buckets.items():
                    if c.count(bucket) != n:
                        raise RuntimeError(f"{name}'s unchanged pass changed the bucket")
                    c.drop(bucket)
                rows += _rows(f"unchanged pass over {n} delivered reports", unchanged, rounds,
                              "aws: a LIST of the bucket against size+mtime; ours: its own "
                              "state, no request")
            with contextlib.suppress(OSError):
                shutil.rmtree(folder)
        return rows
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    print(f"Machine: {machine()}")
    print_rows(run())
