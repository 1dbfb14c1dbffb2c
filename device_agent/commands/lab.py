"""`simulate` (a board on a pseudo-terminal) and `demo` (the whole job on embedded defaults)."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from device_agent.commands import EXIT_INTERRUPTED, Interrupt, echo
from device_agent.core.config import Settings
from device_agent.core.errors import ConfigError


def simulate(settings: Settings, args: argparse.Namespace) -> int:
    """Stream a record into a pty until done, interrupted or nobody reads."""
    from device_agent.lab.demo import default_record
    from device_agent.lab.simulator import BoardSimulator, FaultSpec

    try:
        faults = FaultSpec.parse(args.faults or "")
    except ValueError as exc:
        raise ConfigError(f"--faults: {exc}") from None
    record = args.record or default_record()
    hea = record if Path(record).suffix == ".hea" else Path(f"{record}.hea")
    if not hea.exists():
        raise ConfigError(f"--record {record}: no WFDB header {hea}; name a .hea file or its "
                          "stem, or leave --record out to replay the shipped recording")
    if not Path(args.link).parent.is_dir():
        raise ConfigError(f"--link {args.link}: folder {Path(args.link).parent} does not "
                          "exist; create it or choose another path")
    try:
        sim = BoardSimulator(record, args.link, counts_per_mv=settings.counts_per_mv,
                             byte_order=settings.byte_order, speed=args.speed, loop=args.loop,
                             faults=faults, seconds=args.seconds)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    with Interrupt() as interrupt:
        sim.start()
        try:
            echo(f"simulating {Path(record).name} on {args.link} at {args.speed:g}x "
                 f"(ECG_COUNTS_PER_MV={settings.counts_per_mv:g}); Ctrl-C to stop")
            while not sim.finished.wait(0.5) and not interrupt.stop.is_set():
                pass
        finally:
            sim.stop()
    t = sim.truth
    echo(f"sent {t.frames_sent} frames; lost {len(t.lost)}, damaged {len(t.damaged)}, "
         f"garbage bytes {t.garbage_bytes}, unread bytes discarded {t.bytes_discarded}")
    return EXIT_INTERRUPTED if interrupt.signum is not None and not sim.finished.is_set() \
        else 0


def demo(settings: Settings, args: argparse.Namespace) -> int:
    """`device-agent demo` (`make demo`): the whole job on embedded defaults, then exit.

    The demo tells its own story line by line; the library's INFO log would repeat it, so
    only warnings and errors are logged (`--debug` shows everything).
    """
    from device_agent.commands import setup_logging
    from device_agent.commands.capture import ProgressBar
    from device_agent.lab.demo import default_record, run_demo

    if not args.debug and settings.log_level == "info":
        setup_logging("warning")

    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    out = Path(args.out) if args.out else Path("demo-output") / stamp
    record_path = Path(args.record) if args.record else default_record()
    return run_demo(settings, out=out.resolve(), record_path=record_path,
                    speed=float(args.speed), echo=echo,
                    progress=ProgressBar() if sys.stderr.isatty() else None)
