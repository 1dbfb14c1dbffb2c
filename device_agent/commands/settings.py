"""`device-agent config`: the effective settings and where each came from, secrets hidden."""

from __future__ import annotations

import argparse

from device_agent.commands import echo
from device_agent.core.config import Settings


def run(settings: Settings, args: argparse.Namespace) -> int:
    rows = settings.redacted()
    width = max(len(k) for k, _, _ in rows)
    for key, value, source in rows:
        echo(f"{key:<{width}} = {value:<24} # {source}")
    return 0
