"""The serial reader: opens by URL, drains on a thread, reconnects, stops promptly."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import serial

from device_agent.core.errors import SerialLinkError
from device_agent.lab.simulator import encode_frames
from device_agent.link.port import (
    MIN_INTERVAL_S,
    READ_CHUNK,
    READ_INTERVAL_S,
    TTY_BUFFER_BYTES,
    SerialReader,
    open_port,
)
from tests.conftest import wait_until


def test_bad_path_fails_fast_with_a_clear_message(tmp_path):
    reader = SerialReader(str(tmp_path / "ttyUSB9"))
    with pytest.raises(SerialLinkError, match=r"ttyUSB9.*check the board"):
        reader.start(fail_fast=True)


def test_reads_frames_from_a_loop_url():
    port = serial.serial_for_url("loop://", timeout=0.05)
    frames = encode_frames(np.full((50, 8), 2048, np.uint16), np.arange(50)).tobytes()

    def opener(url, baudrate):  # loop:// echoes what is written to the same instance
        return port

    reader = SerialReader("loop://", opener=opener).start()
    try:
        wait_until(lambda: reader.state.connected, timeout=5, what="the port open")
        port.write(frames)  # after the open, which empties the input buffer
        wait_until(lambda: reader.state.frames_decoded == 50, timeout=5, what="50 frames")
        batches = []
        while (b := reader.get(0.01)) is not None:
            batches.append(b)
        assert sum(len(b) for b in batches) == 50
        assert reader.state.connected and reader.state.last_byte_at is not None
    finally:
        reader.stop()


class _FlakyPort:
    """A port that fails a read once, like an adapter that vanishes."""

    def __init__(self, fail):
        self.fail = fail
        self.in_waiting = 0

    def read(self, n):
        if self.fail:
            raise serial.SerialException("device reports readiness to read but returned no data")
        return b""

    def reset_input_buffer(self):
        pass

    def close(self):
        pass


def test_reconnects_after_the_adapter_vanishes_and_logs_once(caplog):
    opened = []
    gone = {"until": 3}

    def opener(url, baudrate):
        opened.append(url)
        if len(opened) == 1:
            return _FlakyPort(fail=True)
        if len(opened) <= gone["until"]:
            raise SerialLinkError(f"cannot open serial port {url}: not there")
        return _FlakyPort(fail=False)

    caplog.set_level(logging.INFO, logger="device_agent.link.port")
    reader = SerialReader("/dev/ttyFAKE", opener=opener, retry_min_s=0.01, retry_max_s=0.02)
    reader.start()
    try:
        wait_until(lambda: reader.state.reconnects == 1 and reader.state.connected,
                   timeout=5, what="reconnect")
    finally:
        reader.stop()
    lines = [r.getMessage() for r in caplog.records]
    assert sum("lost" in line for line in lines) == 1  # not one per retry
    assert sum("is back (reconnect" in line for line in lines) == 1
    assert len(opened) == 4


def test_open_port_is_exclusive(tmp_path):
    import os
    import tty

    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    try:
        first = open_port(path)
        try:
            with pytest.raises(SerialLinkError, match="cannot open"):
                open_port(path)
        finally:
            first.close()
    finally:
        os.close(slave)
        os.close(master)


@pytest.fixture
def pty():
    """A raw pty: (master fd, slave path), as the board simulator makes."""
    import os
    import tty

    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    os.close(slave)
    state = {"master": master}
    yield state, path
    if state["master"] is not None:
        os.close(state["master"])


def _numbered(first: int, last: int) -> bytes:
    """Frames first..last-1 whose channel I holds the frame number (to see which arrived)."""
    counts = np.full((last - first, 8), 2048, np.uint16)
    counts[:, 0] = np.arange(first, last)
    return encode_frames(counts, np.arange(first, last)).tobytes()


def _collect(reader: SerialReader, n: int) -> np.ndarray:
    got: list[np.ndarray] = []

    def more() -> bool:
        batch = reader.get(0.05)
        if batch is not None:
            got.append(batch.counts[:, 0])
        return sum(len(g) for g in got) >= n

    wait_until(more, timeout=10, what=f"{n} frames")
    return np.concatenate(got)


def test_open_discards_what_the_kernel_held_before(pty):
    import os

    state, path = pty
    os.write(state["master"], _numbered(0, 100))  # a board nobody was reading
    reader = SerialReader(path).start(fail_fast=True)
    try:
        os.write(state["master"], _numbered(100, 200))
        assert _collect(reader, 100).tolist() == list(range(100, 200))
    finally:
        reader.stop()


@pytest.mark.parametrize("read_first", [False, True])
def test_clear_drops_every_frame_that_arrived_before_it(pty, read_first):
    import os

    state, path = pty
    reader = SerialReader(path).start(fail_fast=True)
    try:
        os.write(state["master"], _numbered(0, 150))  # 3300 B: one read, not yet due
        if read_first:  # read and queued, rather than still in the kernel's buffer
            wait_until(lambda: reader.state.bytes_read == 3300, timeout=5, what="the read")
        reader.clear()
        os.write(state["master"], _numbered(150, 300))
        assert _collect(reader, 150).tolist() == list(range(150, 300))
        assert reader.get(0.3) is None
    finally:
        reader.stop()


def test_an_unplugged_pty_is_noticed_and_stop_is_prompt(pty, caplog):
    import os

    state, path = pty
    caplog.set_level(logging.INFO, logger="device_agent.link.port")
    reader = SerialReader(path, retry_min_s=0.01, retry_max_s=0.02).start(fail_fast=True)
    os.close(state["master"])  # the adapter goes away
    state["master"] = None
    try:
        wait_until(lambda: not reader.state.connected, timeout=5, what="the loss noticed")
    finally:
        reader.stop()
    assert reader._thread is None  # joined, not left behind
    assert not any("did not stop" in r.getMessage() for r in caplog.records)
    assert any("lost" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("rate,expect", [
    (0, READ_INTERVAL_S),  # silence: the longest sleep
    (11_000, READ_CHUNK / 11_000),  # the board: wake when the kernel is half full
    (275_000, READ_CHUNK / 275_000),  # a simulator at 25x
    (10_000_000, MIN_INTERVAL_S),
])
def test_the_reader_sleeps_until_the_kernel_buffer_is_half_full(rate, expect):
    reader = SerialReader("loop://")
    assert reader._next_wait(int(rate * 0.1), 0.1) == pytest.approx(expect)
    assert READ_CHUNK == TTY_BUFFER_BYTES // 2 and READ_CHUNK / 11_000 < READ_INTERVAL_S
