"""A record captured before the clock is synchronised is held, never named, then released."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from device_agent.capture import capture_package, release_held
from device_agent.core.clock import Clock, held_dir
from device_agent.core.config import load_settings
from device_agent.lab.demo import default_record
from device_agent.lab.simulator import encode_frames, record_counts
from device_agent.link.framing import FrameDecoder, Frames
from device_agent.link.port import LinkState
from device_agent.shipping.outbox import Outbox

BOOT_1970 = 3600.0  # a board without an RTC boots at the epoch


class FramesReader:
    """A reader stand-in that hands over decoded frames of a real recording, then nothing."""

    url = "fake://board"

    def __init__(self, settings) -> None:
        counts = record_counts(default_record(), settings.counts_per_mv)[:5000]
        data = encode_frames(counts, np.arange(5000) & 0x3F).tobytes()
        self.decoder = FrameDecoder(byte_order="high-first", sampling_rate=500)
        self.batches = [self.decoder.feed(data[i:i + 1100]) for i in range(0, len(data), 1100)]

    def clear(self) -> int:
        return 0

    def get(self, timeout: float) -> Frames | None:
        return self.batches.pop(0) if self.batches else None

    @property
    def state(self) -> LinkState:
        d = self.decoder
        return LinkState(self.url, True, None, 0, d.frames_decoded, d.frames_lost,
                         d.garbage_bytes, 0, None)


class StepClock(Clock):
    """A clock whose wall time and sync state the test sets; monotonic time is real."""

    def __init__(self, wall: float, synced: bool) -> None:
        self.wall, self.is_synced = wall, synced
        super().__init__(check="ntp", wall=lambda: self.wall,
                         kernel=lambda: self.is_synced, timesyncd=lambda: False)


def _settings(tmp_path: Path):
    return load_settings(env_file=None, environ={}).replace(
        state_dir=tmp_path / "state", counts_per_mv=500.0, disk_reserve_mb=0,
        device_serial="HOLD-1")


def test_unsynced_capture_is_held_then_named_from_monotonic_time(tmp_path: Path):
    settings = _settings(tmp_path)
    clock = StepClock(BOOT_1970, synced=False)
    with Outbox.open(settings) as outbox:
        outcome = capture_package(FramesReader(settings), settings, {"patient_name": "Syn Thetic"},
                                  outbox=outbox, clock=clock)
        assert outcome.held is not None and outcome.info is None and not outcome.queued
        assert not (tmp_path / "state" / "records").exists(), "nothing named from a 1970 clock"
        assert outbox.stats().pending == 0

        # Still unsynchronised: a pass releases nothing.
        assert release_held(settings, outbox=outbox, clock=clock) == []

        # NTP syncs: the wall clock jumps to the real time.
        clock.wall, clock.is_synced = 1_800_000_000.0, True
        released = release_held(settings, outbox=outbox, clock=clock)
        assert len(released) == 1
        info = released[0].info
        assert info is not None and released[0].queued
        captured_at = info.acquired_at
        doc = json.loads((info.folder / f"ecg_data_{info.stamp}.json").read_bytes())
        # Named from the synced clock minus the monotonic time since capture (seconds here).
        assert doc["acquired_at"] == captured_at
        assert abs(1_800_000_000.0 - _epoch(captured_at)) < 60
        assert info.stamp.startswith("2027")
        assert outbox.stats().pending == len(info.all_files) == 5  # with the DICOM copy
        assert not any(held_dir(settings.state_dir).iterdir()), "the held copy goes once packaged"
        # A second pass finds nothing more to release and queues nothing twice.
        assert release_held(settings, outbox=outbox, clock=clock) == []
        assert outbox.stats().pending == len(info.all_files) == 5  # with the DICOM copy


def test_capture_held_in_an_earlier_boot_is_never_guessed(tmp_path: Path, monkeypatch):
    settings = _settings(tmp_path)
    clock = StepClock(BOOT_1970, synced=False)
    with Outbox.open(settings) as outbox:
        outcome = capture_package(FramesReader(settings), settings, None, outbox=outbox,
                                  clock=clock)
        assert outcome.held is not None
        ticket = outcome.held / "held.json"
        data = json.loads(ticket.read_text())
        ticket.write_text(json.dumps({**data, "boot_id": "an-earlier-boot"}))
        clock.wall, clock.is_synced = 1_800_000_000.0, True
        assert release_held(settings, outbox=outbox, clock=clock) == []
        undated = tmp_path / "state" / "undated" / outcome.held.name
        assert (undated / "ecg_data.json").exists(), "kept for a person, not deleted"
        assert outbox.stats().pending == 0


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def test_a_named_held_record_keeps_its_name_across_a_reboot_and_a_later_clock(tmp_path: Path):
    """Once named (named.json, durable), a held record is packaged under that name even by
    a retry in the next boot or with the clock a second later: never undated, never renamed."""
    from device_agent.core.clock import NAME_FILE, TICKET_NAME, name_held

    settings = _settings(tmp_path)
    clock = StepClock(BOOT_1970, synced=False)
    with Outbox.open(settings) as outbox:
        outcome = capture_package(FramesReader(settings), settings, None, outbox=outbox,
                                  clock=clock)
        folder = outcome.held
        assert folder is not None and outcome.record.record_id is not None
        from datetime import datetime

        first = name_held(folder, datetime.fromtimestamp(1_800_000_000.9995).astimezone(),
                          outcome.record.record_id)
        # a later name never replaces the first one
        assert name_held(folder, datetime.fromtimestamp(1_800_000_001.0005).astimezone(),
                         "another-id") == first
        ticket = folder / TICKET_NAME
        ticket.write_text(json.dumps({**json.loads(ticket.read_text()), "boot_id": "earlier"}))
        clock.wall, clock.is_synced = 1_800_000_001.0005, True
        released = release_held(settings, outbox=outbox, clock=clock)
        assert len(released) == 1 and released[0].info is not None
        info = released[0].info
        assert info.stamp == first.acquired_at.strftime("%Y%m%d_%H%M%S")
        assert info.record_id == outcome.record.record_id
        assert not (tmp_path / "state" / "undated").exists()
        assert not (folder / NAME_FILE).exists() and not folder.exists()


def test_a_release_cut_while_removing_the_held_copy_is_finished_not_redone(tmp_path: Path):
    """The ticket goes first: a folder left with its name and no ticket is swept, and no
    pass packages it a second time."""
    from device_agent.core.clock import NAME_FILE, TICKET_NAME

    settings = _settings(tmp_path)
    clock = StepClock(BOOT_1970, synced=False)
    with Outbox.open(settings) as outbox:
        outcome = capture_package(FramesReader(settings), settings, None, outbox=outbox,
                                  clock=clock)
        clock.wall, clock.is_synced = 1_800_000_000.0, True
        released = release_held(settings, outbox=outbox, clock=clock)
        assert len(released) == 1 and outcome.held is not None
        pending = outbox.stats().pending
        # what a cut after the ticket's unlink leaves: the rest of the folder
        leftover = outcome.held.parent / "cut-part-way"
        leftover.mkdir()
        (leftover / NAME_FILE).write_text(json.dumps(
            {"acquired_at": "2027-01-15T08:00:00+00:00", "record_id": "x"}))
        (leftover / "ecg_data.json").write_bytes(b"{}")
        assert not (leftover / TICKET_NAME).exists()
        assert release_held(settings, outbox=outbox, clock=clock) == []
        assert not leftover.exists()
        assert outbox.stats().pending == pending
