"""Clock trust and the held-capture arithmetic, with injected time sources."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from device_agent.core import clock as clock_mod
from device_agent.core.clock import Clock, HoldTicket, hold, ready, stamp_for

T2026 = datetime(2026, 11, 27, 12, 0, 0).timestamp()


class FakeTime:
    def __init__(self, wall: float, mono: float = 1000.0) -> None:
        self.wall, self.mono = wall, mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def make_clock(t: FakeTime, *, kernel=False, timesyncd=False, check="ntp") -> Clock:
    return Clock(check=check, wall=lambda: t.wall, mono=lambda: t.mono,
                 kernel=lambda: kernel, timesyncd=lambda: timesyncd)


def test_1970_is_never_trusted():
    t = FakeTime(wall=12.0)
    for check in ("ntp", "floor"):
        state = make_clock(t, kernel=True, timesyncd=True, check=check).state()
        assert not state.synced
        assert "1970" in state.reason


def test_ntp_check_needs_evidence():
    t = FakeTime(wall=T2026)
    assert not make_clock(t).synced()
    assert "NTP" in make_clock(t).state().reason
    assert make_clock(t, kernel=True).synced()
    assert make_clock(t, timesyncd=True).synced()
    assert make_clock(t, check="floor").synced()
    assert "no sync evidence" in make_clock(t, kernel=None).state().reason


def test_now_is_aware_local_time():
    now = make_clock(FakeTime(wall=T2026)).now()
    assert now.tzinfo is not None
    assert now.timestamp() == pytest.approx(T2026)


def test_kernel_probe_answers_on_linux():
    assert clock_mod.kernel_synced() in (True, False, None)


def test_held_capture_stamped_from_monotonic_offset(tmp_path):
    t = FakeTime(wall=5.0, mono=100.0)  # booted in 1970
    clock = make_clock(t, kernel=True)
    ticket = HoldTicket(t.mono, "boot-a", t.wall)
    assert stamp_for(ticket, clock, current_boot="boot-a") is None
    folder = hold(tmp_path / "held", {"ecg_data.json": b"{}"}, ticket)
    assert json.loads((folder / "held.json").read_text())["boot_id"] == "boot-a"
    t.advance(42.0)
    t.wall = T2026  # NTP stepped the clock 42 s after the capture
    when = stamp_for(ticket, clock, current_boot="boot-a")
    assert when is not None
    assert when.timestamp() == pytest.approx(T2026 - 42.0)
    stampable, orphaned = ready(tmp_path / "held", clock, current_boot="boot-a")
    assert [p for p, _ in stampable] == [folder]
    assert orphaned == []


def test_held_capture_from_another_boot_cannot_be_stamped(tmp_path):
    t = FakeTime(wall=T2026)
    clock = make_clock(t, kernel=True)
    folder = hold(tmp_path / "held", {"x": b"1"}, HoldTicket(10.0, "boot-a", 5.0))
    assert stamp_for(HoldTicket(10.0, "boot-a", 5.0), clock, current_boot="boot-b") is None
    assert ready(tmp_path / "held", clock, current_boot="boot-b") == ([], [folder])
