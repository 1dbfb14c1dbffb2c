"""`device-agent doctor`: one line per check, the fix for each problem; exit 1 if any."""

from __future__ import annotations

import argparse

from device_agent.commands import echo
from device_agent.core.config import Settings


def run(settings: Settings, args: argparse.Namespace) -> int:
    from device_agent.ops.doctor import run_doctor

    checks = run_doctor(settings)
    for c in checks:
        echo(f"{'FAIL' if not c.ok else 'warn' if c.warn else 'ok  '} {c.name:<11} {c.message}")
    failed = [c for c in checks if not c.ok]
    echo(f"{len(failed)} problem(s)" if failed else "all checks passed")
    return 1 if failed else 0
