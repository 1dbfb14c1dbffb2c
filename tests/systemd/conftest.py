"""The nspawn tier's fixtures: one booted Debian 12 machine per run, the agent installed in it
by systemd/install.sh the way the README tells an operator, moto behind a fault proxy on the
host's 127.0.0.1 (which the container shares)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faultproxy import FaultProxy
from tests.systemd.machine import Machine, build_root

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
# What a checkout holds that install.sh reads (it tars pyproject, README, constraints and the
# package itself, and copies systemd/ and docs/): the operator's `git clone`, without .git.
CHECKOUT = ("pyproject.toml", "README.md", "constraints.txt", "Makefile", "device_agent",
            "systemd", "docs")
TIMINGS: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter) -> None:
    if TIMINGS:
        terminalreporter.write_line("nspawn tier timings: " + ", ".join(
            f"{k} {v:.1f} s" for k, v in TIMINGS.items()))


def _copy_checkout(dest: Path) -> None:
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in CHECKOUT:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)


@pytest.fixture(scope="session")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    """A booted machine with device-agent installed (not configured, not started)."""
    base, took = build_root(CACHE / "nspawn-root")
    TIMINGS["mmdebstrap"] = took
    started = time.monotonic()
    run_dir = tmp_path_factory.mktemp("nspawn")
    root = run_dir / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(root)], check=True,
                   timeout=300)
    TIMINGS["copy root"] = time.monotonic() - started
    _copy_checkout(root / "root/device-agent")
    box = Machine(root, f"da-tier-{int(time.time()) % 100000}")
    try:
        TIMINGS["boot"] = box.boot()
        started = time.monotonic()
        # README, "Running on a board under systemd": from a checkout, as root.
        proc = box.run("sh", "systemd/install.sh", cwd="/root/device-agent", timeout=900)
        TIMINGS["install.sh"] = time.monotonic() - started
        box.install_log = proc.stdout + proc.stderr  # type: ignore[attr-defined]
        yield box
    finally:
        journal = box.run("journalctl", "--no-pager", "-o", "short-monotonic", check=False)
        (run_dir / "journal.txt").write_text(journal.stdout)
        box.poweroff()
        print(f"\nnspawn machine journal: {run_dir / 'journal.txt'}", file=sys.stderr)


@pytest.fixture(scope="session")
def endpoint(s3_endpoint: str) -> Iterator[FaultProxy]:
    """The fault proxy in front of moto: the URL the unit is configured with."""
    port = int(s3_endpoint.rsplit(":", 1)[1])
    with FaultProxy(port) as proxy:
        yield proxy


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Replaces the suite's guard here: the fault proxy's connection threads serve the
    machine's kept-alive connections, which outlive any one test by design (the proxy's own
    exit joins them at the end of the run)."""
    yield
