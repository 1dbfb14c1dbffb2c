"""`device-agent run`: the service under systemd (Type=notify); this is its process edge.

It reads NOTIFY_SOCKET/WATCHDOG_USEC from the environment, takes the service lock, opens the
outbox, builds the one S3 client and wires everything once (assemble.py).
SIGTERM stops it cleanly (exit 0, as systemd asks); Ctrl-C (SIGINT) stops it with 130.
SIGHUP is left alone: under systemd it is not a request to stop.
"""

from __future__ import annotations

import argparse
import os
import signal

from device_agent.commands import EXIT_INTERRUPTED, Interrupt
from device_agent.core.config import Settings


def run(settings: Settings, args: argparse.Namespace) -> int:
    from device_agent.assemble import assembled
    from device_agent.ops.notify import Notifier
    from device_agent.ops.spool import ServiceLock

    notifier = Notifier.from_environ(os.environ)
    try:
        with Interrupt(signal.SIGTERM, signal.SIGINT) as interrupt, \
                ServiceLock(settings.state_dir), \
                assembled(settings, stop=interrupt.stop) as parts:
            code = parts.service(notifier).run()
    finally:
        notifier.close()
    if interrupt.signum == signal.SIGINT:
        return EXIT_INTERRUPTED
    return code
