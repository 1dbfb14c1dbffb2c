"""The serial reader: opens by URL, drains on a thread, reconnects, stops promptly."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import serial

from device_agent.errors import SerialLinkError
from device_agent.lab.simulator import encode_frames
from device_agent.port import SerialReader, open_port
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
        port.write(frames)
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

    caplog.set_level(logging.INFO, logger="device_agent.port")
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
