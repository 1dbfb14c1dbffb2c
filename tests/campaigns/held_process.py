"""An agent process that releases held captures, for the naming crash test (run, then killed).

`python tests/campaigns/held_process.py --state DIR --endpoint URL --bucket B --offset S`
releases what STATE_DIR/held holds (capture.release_held) with a clock whose wall time is
the monotonic clock plus S seconds, as a synchronised clock moves with the monotonic one, so
the time a held capture is named from (`wall - (monotonic - monotonic_at_capture)`) is the
same in every run with the same S, and 1 ms later with S + 0.001. Then it syncs until the
outbox is empty. `--arm NAME` stops it at checkpoint NAME (held.*, package.*,
capture.queued) and waits to be killed, as agent_process.py does.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.campaigns.agent_process import (  # noqa: E402
    StopAt,
    drain_until_empty,
    settings_for,
)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--offset", type=float, required=True,
                        help="wall clock minus monotonic clock, seconds")
    parser.add_argument("--arm", metavar="CHECKPOINT")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="agent %(levelname)s %(name)s: %(message)s")

    from device_agent.capture import release_held
    from device_agent.core.clock import Clock
    from device_agent.shipping.drain import Drainer
    from device_agent.shipping.outbox import Outbox
    from device_agent.shipping.uploader import Uploader
    from device_agent.sync import SyncLoop

    settings = settings_for(args.state, args.endpoint, args.bucket)
    clock = Clock(check="floor", wall=lambda: time.monotonic() + args.offset,
                  mono=time.monotonic)
    stop = threading.Event()
    with Outbox.open(settings) as outbox:
        released = release_held(settings, outbox=outbox, clock=clock,
                                checkpoint=StopAt(args.arm))
        drainer = Drainer(outbox, Uploader.from_settings(settings), clock=clock, stop=stop,
                          backoff_base_s=0.2, backoff_cap_s=settings.retry_max_backoff_s)
        loop = SyncLoop(settings, outbox=outbox, drainer=drainer, stop=stop, clock=clock)
        drain_until_empty(loop, stop)
        left = outbox.stats().pending
        loop.close()
    print(f"done released={len(released)} pending={left}", flush=True)
    return 0 if left == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
