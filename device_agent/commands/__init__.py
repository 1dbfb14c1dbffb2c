"""The `device-agent` command: `main(argv) -> int`, the process edge.

This package is the only code that parses arguments, prints to the terminal, reads the
process environment, installs signal handlers, sets up logging and picks exit codes. Each
command lives in a module of its own (field commands together) and is imported only when it
runs, so `--help`, `config` and `status` stay fast on a slow board (no numpy, boto3 or
reportlab import). A handler is `run(settings, args) -> int`.

Exit codes: 0 success; 1 the operation ran and failed (capture rejected, verify found a
difference, doctor found a problem, status found the service down or hung, sync met a
broken input or a failed item); 2 usage or configuration error; 3 an external part is
unavailable (serial port, S3, disk, clock); 4 another process holds the outbox lock;
130 interrupted (Ctrl-C, or a signal stopped a one-shot command).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import os
import signal
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from device_agent import __version__
from device_agent.core.errors import AgentError
from device_agent.core.fsutil import storage_condition, storage_message

log = logging.getLogger("device_agent")

EXIT_INTERRUPTED = 130
DEFAULT_ENV_FILE = Path(".env")

# subcommand -> "module:function" under device_agent.commands
HANDLERS = {
    "config": "settings:run",
    "capture": "capture:run",
    "simulate": "lab:simulate",
    "demo": "lab:demo",
    "report": "documents:report",
    "measure": "documents:measure",
    "export": "documents:export",
    "run": "service:run",
    "sync": "sync:run",
    "verify": "verify:run",
    "status": "status:status",
    "queue": "status:queue",
    "doctor": "doctor:run",
}


def echo(text: str = "", *, err: bool = False) -> None:
    """Write one line of command output (stdout, or stderr with err=True)."""
    stream = sys.stderr if err else sys.stdout
    stream.write(text + "\n")
    stream.flush()


class _SetAction(argparse.Action):
    """`--set KEY=VALUE`, repeatable: any setting, highest priority."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        key, sep, value = str(values).partition("=")
        if not sep:
            parser.error(f"{option_string} takes KEY=VALUE, got {values!r}")
        overrides = dict(getattr(namespace, "overrides", None) or {})
        overrides[key.strip()] = value
        namespace.overrides = overrides


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number above 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="device-agent",
        description="Capture 12-lead ECGs from the acquisition board and deliver them to S3.",
        epilog="Exit codes: 0 ok, 1 failed, 2 usage/config error, 3 part unavailable, "
        "4 outbox busy, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"device-agent {__version__}")
    parser.add_argument("--env-file", type=Path, default=None,
                        help="settings file (default ./.env if it exists)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action=_SetAction,
                        help="override any setting, e.g. --set SYNC_INTERVAL_S=5")
    parser.add_argument("--debug", action="store_true", help="debug logs and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("config", help="show the effective settings and where each came from")

    p = sub.add_parser("capture", help="capture one record from the board")
    p.add_argument("--port", help="serial port path or URL (ECG_SERIAL_PORT)")
    p.add_argument("--seconds", type=_positive, help="record length (default 10)")
    p.add_argument("--patient", type=Path, help="patient details JSON file")
    p.add_argument("--out", type=Path, help="output folder (default STATE_DIR/records)")
    p.add_argument("--no-upload", action="store_true",
                   help="withhold: write the package but never upload it")
    p.add_argument("--direct", action="store_true",
                   help="open the port even if the service runs (it normally gets the request)")

    p = sub.add_parser("simulate", help="board simulator on a pseudo-terminal")
    p.add_argument("--record", type=Path,
                   help="WFDB record (.hea path or stem); default: the shipped HR06000")
    p.add_argument("--link", type=Path, required=True, help="symlink to create to the pty")
    p.add_argument("--speed", type=_positive, default=1.0, help="times real time (default 1)")
    p.add_argument("--loop", action="store_true", help="replay the record forever")
    p.add_argument("--faults", default="", help="fault spec, e.g. drop=0.001,garbage=0.0005")
    p.add_argument("--seconds", type=_positive, help="stop after this many seconds of signal")

    p = sub.add_parser("report", help="re-render a PDF report from stored files")
    p.add_argument("--input", type=Path, required=True, help="ecg_data_*.json")
    p.add_argument("--patient", type=Path, help="patient_details_*.json")
    p.add_argument("--out", type=Path, required=True, help="PDF to write")

    p = sub.add_parser("measure", help="measure stored records (ecg_data JSON or WFDB .hea)")
    p.add_argument("files", type=Path, nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="one JSON object a line per input")

    p = sub.add_parser("export", help="write a stored record as DICOM or WFDB")
    p.add_argument("--format", choices=("dicom", "wfdb"), required=True)
    p.add_argument("--input", type=Path, required=True, help="ecg_data_*.json")
    p.add_argument("--patient", type=Path, help="patient_details_*.json (DICOM only)")
    p.add_argument("--out", type=Path, required=True,
                   help="file to write (.dcm), or WFDB stem (writes STEM.hea and STEM.dat)")

    sub.add_parser("run", help="the service: capture requests, sync loop, uploads")

    p = sub.add_parser("sync", help="one sync pass: scan reports/, users.json, drain outbox")
    p.add_argument("--once", action="store_true", help="one pass then exit (default)")
    p.add_argument("--wait", action="store_true", help="wait for the outbox lock")

    p = sub.add_parser("verify", help="check delivered records against the bucket")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--repair", action="store_true",
                   help="queue what is missing or different again (the next sync sends it)")

    p = sub.add_parser("status", help="what the unit is doing, in a second")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    sub.add_parser("doctor", help="check port, permissions, credentials, bucket, clock, disk")

    p = sub.add_parser("queue", help="inspect, retry or add to the outbox")
    qsub = p.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    q = qsub.add_parser("list", help="undelivered items, skipped inputs, withheld packages")
    q.add_argument("--all", action="store_true", help="include delivered items")
    q.add_argument("--json", action="store_true")
    q = qsub.add_parser("retry", help="retry an item now")
    q.add_argument("id", nargs="?", type=int, help="item id")
    q.add_argument("--failed", action="store_true", help="retry every permanently failed item")
    q = qsub.add_parser("add", help="queue a withheld package folder for upload")
    q.add_argument("folder", type=Path)

    p = sub.add_parser("demo", help="the whole job end to end on embedded defaults")
    p.add_argument("--record", type=Path, help="WFDB record to replay")
    p.add_argument("--out", type=Path, help="folder for the demo's files")
    p.add_argument("--speed", type=_positive, default=5.0, help="simulator speed (default 5x)")
    return parser


_CAPTURE_FLAGS = {"port": "ECG_SERIAL_PORT", "seconds": "ECG_CAPTURE_SECONDS"}


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    values = dict(getattr(args, "overrides", None) or {})
    if args.command == "capture":
        for attr, key in _CAPTURE_FLAGS.items():
            value = getattr(args, attr, None)
            if value is not None:
                values[key] = str(value)
    if args.debug:
        values["LOG_LEVEL"] = "debug"
    return values


def setup_logging(level: str) -> None:
    """One event a line on stderr, no timestamps (journald adds them)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # a failed credentials fetch reaches the drainer as one classified UploadError, which it
    # logs once; botocore's own warning would add a traceback per request in flight
    logging.getLogger("botocore.credentials").setLevel(logging.ERROR)


class Interrupt:
    """Signals only set `stop` (and remember which came); restored on exit.

    With `grace_s` (one-shot commands), work that does not heed `stop` within that time
    (a LIST or a put blocked in a read on the main thread, under a read timeout of minutes)
    is cut: SIGALRM then raises KeyboardInterrupt there, which ends the command with 130 as
    a crash would end it, and everything it promises survives a crash anywhere.
    """

    def __init__(self, *signals: int, grace_s: float | None = None) -> None:
        self.stop = threading.Event()
        self.signum: int | None = None
        self._signals = signals or (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        self._grace_s = grace_s
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        first = self.signum is None
        self.signum = signum
        self.stop.set()
        if first and self._grace_s is not None and signal.SIGALRM in self._previous:
            signal.setitimer(signal.ITIMER_REAL, self._grace_s)

    @staticmethod
    def _cut(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handler)
            if self._grace_s is not None:
                self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._cut)
        return self

    def __exit__(self, *exc: object) -> None:
        if signal.SIGALRM in self._previous:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def interrupted(self) -> bool:
        return self.signum is not None


def _resolve(command: str) -> Callable[[Any, argparse.Namespace], int]:
    module_name, _, func = HANDLERS[command].partition(":")
    module = importlib.import_module(f"device_agent.commands.{module_name}")
    handler: Callable[[Any, argparse.Namespace], int] = getattr(module, func)
    return handler


@contextlib.contextmanager
def _logging_restored() -> Iterator[None]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        yield
    finally:
        # In-process callers (tests, the demo) get their logging back as it was.
        root.handlers[:], root.level = saved[0], saved[1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with _logging_restored():
        try:
            return _run(parser, args)
        except BrokenPipeError:
            # The reader of our output went away (`| head`): nothing failed, say nothing.
            with contextlib.suppress(OSError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            return 0


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    setup_logging("debug" if args.debug else "info")
    if not args.command:
        parser.print_help()
        return 2
    state_dir: Path | None = None
    try:
        from device_agent.core.config import load_settings

        env_file = args.env_file if args.env_file is not None else DEFAULT_ENV_FILE
        settings = load_settings(env_file=env_file, env_file_required=args.env_file is not None,
                                 environ=os.environ, overrides=_overrides(args))
        state_dir = settings.state_dir
        setup_logging(settings.log_level)
        return int(_resolve(args.command)(settings, args) or 0)
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        raise
    except AgentError as exc:
        _report(args, exc, str(exc))
        return exc.exit_code
    except (OSError, sqlite3.Error) as exc:
        condition = None if state_dir is None else storage_condition(exc, state_dir)
        if condition is not None:  # STATE_DIR's disk is full or read-only: an external part
            _report(args, exc, storage_message(condition, state_dir or ""))
            return 3
        if isinstance(exc, sqlite3.Error):
            _report(args, exc, f"outbox under STATE_DIR {state_dir}: {exc} (run with --debug "
                               "for the traceback)")
            return 1
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            _report(args, exc, f"disk full: {exc.filename or ''} ({exc.strerror}); nothing "
                               "already stored was lost: free space on the SD card, or lower "
                               "RETENTION_DAYS")
            return 3
        _report(args, exc, f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
                + " (run with --debug for the traceback)")
        return 1
    except Exception as exc:
        _report(args, exc, f"unexpected error: {type(exc).__name__}: {exc} (run with --debug "
                           "for the traceback)")
        return 1


def _report(args: argparse.Namespace, exc: BaseException, message: str) -> None:
    if args.debug:
        log.error("%s", message, exc_info=exc)
    else:
        log.error("%s", message)
