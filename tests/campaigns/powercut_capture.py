"""One capture's packaging and queueing, as a process the power-cut check runs under strace.

`python tests/campaigns/powercut_capture.py --state DIR --record HR06000 --at ISO` opens the
outbox as the service holds it, builds a measured record from a real recording
(wfdb.to_record, then capture.measure_once: what capture_package does with the board's
frames) and calls capture.package_and_decide exactly as a capture does. The moment
package_and_decide returns is written to stderr as a marker line the tracer reads: from
there on the capture is acknowledged and must survive any power cut.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# the tracer looks for this in the data of a write(2, ...) (powercut.MARK_PREFIX)
MARK_PREFIX = b"\x00powercut:"
PATIENT = {"first_name": "Synthetic", "last_name": "Powercut", "age": 61, "gender": "M"}


def mark(name: str) -> None:
    """A marker in the trace: one write to stderr that the tracer recognises."""
    os.write(2, MARK_PREFIX + name.encode("ascii") + b"\n")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--record", default="HR06000", help="recording under tests/data/ecg")
    parser.add_argument("--at", required=True, help="acquisition time, ISO 8601 with offset")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="extra settings")
    args = parser.parse_args()

    from device_agent.capture import measure_once, package_and_decide
    from device_agent.core.record import DeviceInfo
    from device_agent.lab import wfdb
    from device_agent.shipping.outbox import Outbox
    from tests.campaigns.agent_process import ECG, settings_for

    extra = dict(item.split("=", 1) for item in args.overrides)
    settings = settings_for(args.state, "http://127.0.0.1:9", "unused", **extra)
    record = wfdb.to_record(ECG / f"{args.record}.hea",
                            acquired_at=datetime.fromisoformat(args.at),
                            device=DeviceInfo(serial=settings.device_serial, model="ECG12-PI"))
    record = measure_once(record, mains_hz=settings.mains_hz)
    with Outbox.open(settings) as outbox:
        mark("outbox.open")
        outcome = package_and_decide(record, PATIENT, settings, outbox,
                                     out_root=Path(settings.state_dir) / "records",
                                     withheld=False)
        mark("capture.acknowledged")
    print(f"queued={outcome.queued} folder={outcome.folder}", flush=True)
    return 0 if outcome.queued else 1


if __name__ == "__main__":
    sys.exit(main())
