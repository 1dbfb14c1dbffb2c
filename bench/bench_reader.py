"""The always-on serial reader: CPU per second of board data, against a bare read loop.

A board simulator streams frames at the board's real rate (500 frames/s, 11,000 B/s) into a
pty from a process of its own. Each contestant runs in a subprocess of its own, so its
process CPU (getrusage, all its threads) is its own and nothing else:

- reader: SerialReader on the pty, the main thread taking batches with get() as a capture
  does (so it wakes once per batch too) and unpacking the samples once at the end;
- reader, nobody consuming: the service between captures (batches queue and age out);
- reader, 550 B reads: the read policy before this change (read(max(in_waiting, 550)) in a
  loop, ~20 reads a second each waiting in select for the rest), with today's decoder;
- bare loop: os.read on the pty, then time.sleep(0.1), nothing else: ten wake-ups a second
  and no decoding, the floor any reader of this link pays.

Each child opens the pty, reads for SETTLE_S (dropping the backlog the pty held), then
measures its CPU over RUN_S of reading. CPU per second of board data = CPU / (bytes read /
11,000). Contestants run round-robin ROUNDS times; medians. Voluntary context switches per
second (ru_nvcsw) count the wake-ups. `python bench/bench_reader.py` prints the table.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import interleaved, machine, medians, print_rows, reported  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "15"))  # fewer only to try things out
RUN_S = 3.0
SETTLE_S = 0.5
BYTES_PER_S = 500 * 22  # the board's link
CONTESTANTS = ("reader", "reader-idle", "reader-550", "bare")
LABELS = {
    "reader": "SerialReader, a capture consuming",
    "reader-idle": "SerialReader, nobody consuming (service between captures)",
    "reader-550": "SerialReader with the old read policy (550 B reads), today's decoder",
}


def _feed(link: str) -> None:
    """Run the board simulator at real speed on `link` until SIGTERM."""
    from device_agent.lab.demo import default_record
    from device_agent.lab.simulator import BoardSimulator

    sim = BoardSimulator(default_record(), link, counts_per_mv=400.0, speed=1.0, loop=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sim.start()
    print("ready", flush=True)
    stop.wait()
    sim.stop()


def _usage() -> tuple[float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_nvcsw


def _bare(link: str) -> tuple[float, int, int]:
    fd = os.open(link, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)

    def read() -> int:
        try:
            return len(os.read(fd, 65536))
        except BlockingIOError:
            return 0

    settle = time.monotonic() + SETTLE_S
    while time.monotonic() < settle:
        read()
        time.sleep(0.1)
    cpu0, sw0 = _usage()
    n = 0
    end = time.monotonic() + RUN_S
    while time.monotonic() < end:
        n += read()
        time.sleep(0.1)
    cpu1, sw1 = _usage()
    os.close(fd)
    return cpu1 - cpu0, sw1 - sw0, n


def _old_reader_class() -> type:
    """SerialReader with the read policy it had before: up to 550 B per read, no sleep."""
    from device_agent.link.port import Port, SerialReader

    class OldReader(SerialReader):
        def _drain(self, port: Port) -> bytes:
            return port.read(max(port.in_waiting, 550))

        def _next_wait(self, nbytes: int, elapsed: float) -> float:
            return 0.0

    return OldReader


def _reader(link: str, name: str) -> tuple[float, int, int]:
    from device_agent.link.framing import Frames
    from device_agent.link.port import SerialReader

    cls = _old_reader_class() if name == "reader-550" else SerialReader
    reader = cls(link).start(fail_fast=True)
    try:
        settle = time.monotonic() + SETTLE_S
        while time.monotonic() < settle:
            reader.get(max(settle - time.monotonic(), 0))
        reader.clear()
        bytes0 = reader.state.bytes_read
        cpu0, sw0 = _usage()
        end = time.monotonic() + RUN_S
        if name == "reader-idle":
            threading.Event().wait(RUN_S)
        else:  # as capture_record: take every batch, unpack the samples once at the end
            batches = []
            while (left := end - time.monotonic()) > 0:
                if (batch := reader.get(left)) is not None:
                    batches.append(batch)
            Frames.concat(batches).counts  # noqa: B018 (the unpacking is the point)
        cpu1, sw1 = _usage()
        return cpu1 - cpu0, sw1 - sw0, reader.state.bytes_read - bytes0
    finally:
        reader.stop()


def _child(name: str, link: str) -> None:
    cpu, switches, nbytes = _bare(link) if name == "bare" else _reader(link, name)
    print(json.dumps({"cpu_s": cpu, "switches": switches, "bytes": nbytes}), flush=True)


def run() -> list[dict]:
    """Rows: CPU per second of board data of each reader, as a ratio to the bare loop."""
    extra: dict[str, list[dict]] = {name: [] for name in CONTESTANTS}
    with tempfile.TemporaryDirectory() as tmp:
        link = str(Path(tmp) / "board")
        feeder = subprocess.Popen([sys.executable, __file__, "feed", link],
                                  stdout=subprocess.PIPE, text=True)
        try:
            if feeder.stdout is None or feeder.stdout.readline().strip() != "ready":
                raise RuntimeError("the board simulator did not start")

            def contestant(name: str) -> Callable[[], float]:
                def one() -> float:
                    out = subprocess.run([sys.executable, __file__, "child", name, link],
                                         capture_output=True, text=True, check=True, timeout=60)
                    result = json.loads(out.stdout.strip().splitlines()[-1])
                    if result["bytes"] < RUN_S * BYTES_PER_S / 2:
                        raise RuntimeError(f"{name} read only {result['bytes']} bytes")
                    extra[name].append(result)
                    return result["cpu_s"] / (result["bytes"] / BYTES_PER_S)

                return one

            times = medians(interleaved({name: contestant(name) for name in CONTESTANTS},
                                         rounds=ROUNDS, measure=reported))
        finally:
            feeder.terminate()
            feeder.wait(timeout=10)
    base = times["bare"]

    def per_s(name: str, key: str) -> float:
        runs = extra[name][1:]  # the first is the warm-up
        return statistics.median(r[key] / (r["bytes"] / BYTES_PER_S) for r in runs)

    rows = []
    for name in CONTESTANTS[:-1]:
        rows.append({
            "benchmark": "reader",
            "metric": f"CPU ms per s of board data, {LABELS[name]}",
            "value": round(times[name] * 1000, 2),
            "baseline": round(base * 1000, 2),
            "ratio": round(times[name] / base, 2),
            "note": (f"median of {ROUNDS}, round-robin, process CPU of a subprocess reading a "
                     f"pty fed at 500 frames/s for {RUN_S:g} s; baseline = os.read + "
                     f"sleep(0.1) loop; wake-ups/s {per_s(name, 'switches'):.0f} vs "
                     f"{per_s('bare', 'switches'):.0f}; {machine()}"),
        })
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "feed":
        _feed(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "child":
        _child(sys.argv[2], sys.argv[3])
    else:
        print_rows(run())
