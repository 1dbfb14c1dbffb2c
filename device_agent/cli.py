"""The `device-agent` command: `main(argv) -> int`, the process edge.

Subcommand handlers live in the module of their stage and are imported only when run,
so `--help`, `config` and `status` stay fast on a slow board (no numpy, boto3 or
reportlab import). Each handler is `cmd_NAME(settings, args) -> int`.

Exit codes: 0 success; 1 the operation ran and failed (capture rejected, verify found a
difference, doctor found a problem); 2 usage or configuration error; 3 an external part
is unavailable (serial port, S3, disk, clock); 4 another process holds the outbox lock;
130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from device_agent import __version__
from device_agent.errors import AgentError

log = logging.getLogger("device_agent")

# subcommand -> "module:function"
HANDLERS = {
    "config": "device_agent.cli:cmd_config",
    "capture": "device_agent.capture:cmd_capture",
    "simulate": "device_agent.lab.simulator:cmd_simulate",
    "report": "device_agent.report:cmd_report",
    "run": "device_agent.service:cmd_run",
    "sync": "device_agent.sync:cmd_sync",
    "verify": "device_agent.verify:cmd_verify",
    "status": "device_agent.status:cmd_status",
    "doctor": "device_agent.status:cmd_doctor",
    "queue": "device_agent.status:cmd_queue",
    "demo": "device_agent.lab.demo:cmd_demo",
}


class _SetAction(argparse.Action):
    """`--set KEY=VALUE`, repeatable: any setting, highest priority."""

    def __call__(self, parser, namespace, values, option_string=None):
        key, sep, value = values.partition("=")
        if not sep:
            parser.error(f"{option_string} takes KEY=VALUE, got {values!r}")
        overrides = dict(getattr(namespace, "overrides", None) or {})
        overrides[key.strip()] = value
        namespace.overrides = overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="device-agent",
        description="Capture 12-lead ECGs from the acquisition board and deliver them to S3.",
        epilog="Exit codes: 0 ok, 1 failed, 2 usage/config error, 3 part unavailable, "
        "4 outbox busy, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"device-agent {__version__}")
    parser.add_argument("--env-file", type=Path, default=Path(".env"),
                        help="settings file (default ./.env)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action=_SetAction,
                        help="override any setting, e.g. --set SYNC_INTERVAL_S=5")
    parser.add_argument("--debug", action="store_true", help="debug logs and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("config", help="show the effective settings and where each came from")

    p = sub.add_parser("capture", help="capture one record from the board")
    p.add_argument("--port", help="serial port path or URL (ECG_SERIAL_PORT)")
    p.add_argument("--seconds", type=float, help="record length (default 10)")
    p.add_argument("--patient", type=Path, help="patient details JSON file")
    p.add_argument("--out", type=Path, help="output folder (default STATE_DIR/records)")
    p.add_argument("--no-upload", action="store_true", help="do not queue for upload")
    p.add_argument("--direct", action="store_true",
                   help="open the port even if the service runs (it normally gets the request)")

    p = sub.add_parser("simulate", help="board simulator on a pseudo-terminal")
    p.add_argument("--record", type=Path,
                   help="WFDB record (.hea path or stem); default: the shipped HR06000")
    p.add_argument("--link", type=Path, required=True, help="symlink to create to the pty")
    p.add_argument("--speed", type=float, default=1.0, help="times real time (default 1)")
    p.add_argument("--loop", action="store_true", help="replay the record forever")
    p.add_argument("--faults", default="", help="fault spec, e.g. drop=0.001,garbage=0.0005")
    p.add_argument("--seconds", type=float, help="stop after this many seconds of signal")

    p = sub.add_parser("report", help="re-render a PDF report from stored files")
    p.add_argument("--input", type=Path, required=True, help="ecg_data_*.json")
    p.add_argument("--patient", type=Path, help="patient_details_*.json")
    p.add_argument("--out", type=Path, required=True, help="PDF to write")

    sub.add_parser("run", help="the service: capture requests, sync loop, uploads")

    p = sub.add_parser("sync", help="one sync pass: scan reports/, users.json, drain outbox")
    p.add_argument("--once", action="store_true", help="one pass then exit (default)")
    p.add_argument("--wait", action="store_true", help="wait for the outbox lock")

    p = sub.add_parser("verify", help="check delivered records against the bucket")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("status", help="what the unit is doing, in a second")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    sub.add_parser("doctor", help="check port, credentials, bucket, clock, disk; say what to fix")

    p = sub.add_parser("queue", help="inspect or retry the outbox")
    qsub = p.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    q = qsub.add_parser("list", help="list undelivered items")
    q.add_argument("--all", action="store_true", help="include delivered items")
    q.add_argument("--json", action="store_true")
    q = qsub.add_parser("retry", help="retry an item now")
    q.add_argument("id", nargs="?", type=int, help="item id")
    q.add_argument("--failed", action="store_true", help="retry every permanently failed item")

    p = sub.add_parser("demo", help="the whole job end to end on embedded defaults")
    p.add_argument("--record", type=Path, help="WFDB record to replay")
    p.add_argument("--out", type=Path, help="folder for the demo's files")
    p.add_argument("--speed", type=float, default=5.0, help="simulator speed (default 5x)")
    return parser


_CAPTURE_FLAGS = {"port": "ECG_SERIAL_PORT", "seconds": "ECG_CAPTURE_SECONDS"}


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    values = dict(getattr(args, "overrides", None) or {})
    for attr, key in _CAPTURE_FLAGS.items():
        value = getattr(args, attr, None)
        if value is not None and args.command == "capture":
            values[key] = str(value)
    if args.debug:
        values["LOG_LEVEL"] = "debug"
    return values


def echo(text: str = "", *, err: bool = False) -> None:
    """Write one line of command output (stdout, or stderr with err=True); handlers use this."""
    stream = sys.stderr if err else sys.stdout
    stream.write(text + "\n")
    stream.flush()


def setup_logging(level: str) -> None:
    """One event a line on stderr, no timestamps (journald adds them)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_config(settings, args) -> int:
    """Print the effective settings, secrets redacted, with their sources."""
    rows = settings.redacted()
    width = max(len(k) for k, _, _ in rows)
    for key, value, source in rows:
        echo(f"{key:<{width}} = {value:<24} # {source}")
    return 0


def _resolve(command: str):
    module_name, _, func = HANDLERS[command].partition(":")
    return getattr(importlib.import_module(module_name), func)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        return _run(parser, args)
    finally:
        # In-process callers (tests, the demo) get their logging back as it was.
        root.handlers[:], root.level = saved[0], saved[1]


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    setup_logging("debug" if args.debug else "info")
    if not args.command:
        parser.print_help()
        return 2
    try:
        from device_agent.config import load_settings

        settings = load_settings(env_file=args.env_file, overrides=_overrides(args))
        setup_logging(settings.log_level)
        return int(_resolve(args.command)(settings, args) or 0)
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except AgentError as exc:
        if args.debug:
            log.exception("%s", exc)
        else:
            log.error("%s", exc)
        return exc.exit_code
    except Exception as exc:
        if args.debug:
            log.exception("unexpected error")
        else:
            log.error("unexpected error: %s: %s (run with --debug for the traceback)",
                      type(exc).__name__, exc)
        return 1
