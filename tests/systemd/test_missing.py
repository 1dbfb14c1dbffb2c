"""The tier says in one phrase what a machine lacks to run it (runs in the quick suite)."""

from __future__ import annotations

import shutil

import pytest

from tests.systemd import machine


def test_missing_names_each_tool_and_its_package(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(machine.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(shutil, "which", lambda name: None if name != "nsenter" else "/x")
    assert machine.missing() == "root, systemd-nspawn (systemd-container), mmdebstrap (mmdebstrap)"


def test_nothing_missing_on_a_ready_host(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(machine.os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(machine.Path, "exists", lambda self: True)
    assert machine.missing() is None


def test_the_root_key_follows_its_packages(monkeypatch: pytest.MonkeyPatch):
    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap not installed (the key includes its version)")
    key = machine.root_key()
    monkeypatch.setattr(machine, "PACKAGES", (*machine.PACKAGES, "curl"))
    assert machine.root_key() != key
