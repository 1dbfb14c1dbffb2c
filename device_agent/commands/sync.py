"""`device-agent sync [--once] [--wait]`: one sync pass, as the service makes them.

Exit 0 when the pass met no problem; 1 when an item failed for good or an input was skipped
(a broken users.json, a report that cannot be uploaded); 3 when S3 could not be reached or
refused the credentials (uploads paused, retried later); 4 while another process's pass
holds the outbox lock (the service holds it only during its passes: between them this runs
a pass of its own); 130 when interrupted.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from device_agent.commands import EXIT_INTERRUPTED, Interrupt, echo
from device_agent.core.config import Settings

if TYPE_CHECKING:
    from device_agent.sync import PassResult


def run(settings: Settings, args: argparse.Namespace) -> int:
    # a put in flight gets the drainer's grace; a blocked read on this thread is cut after 1 s
    with Interrupt(grace_s=1.0) as interrupt:
        result = _pass(settings, args, interrupt)
    if interrupt.interrupted:
        echo(f"sync: interrupted; {result.summary()}", err=True)
        return EXIT_INTERRUPTED
    # each error was logged once, where it happened; the summary counts what was done
    echo(f"sync: {result.summary()}" + (f", {len(result.errors)} error(s) above"
                                         if result.errors else ""))
    if result.paused or result.retrying:
        return 3
    if result.failed or result.errors or result.skipped:  # README: an input was skipped
        return 1
    return 0


def _pass(settings: Settings, args: argparse.Namespace, interrupt: Interrupt) -> PassResult:
    from device_agent.assemble import assembled

    with assembled(settings, stop=interrupt.stop) as parts:
        loop = parts.sync_loop()
        try:
            return loop.run_once(wait=bool(args.wait))
        finally:
            loop.close()
