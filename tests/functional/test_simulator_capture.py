"""End to end over a real pty: simulator -> reader -> capture -> ecg_data JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from device_agent.capture import capture_record
from device_agent.clock import Clock
from device_agent.commands import main
from device_agent.config import load_settings
from device_agent.errors import CaptureRejected, SerialLinkError
from device_agent.lab.simulator import MID_SCALE, BoardSimulator, FaultSpec, resample
from device_agent.lab.wfdb import read_record
from device_agent.port import SerialReader
from device_agent.record import LEAD_ORDER, MEASURED_LEADS, derive_leads
from tests.conftest import RECORDS, wait_until

CPM = 400.0
STEP = 1000.0 / CPM  # one count in uV
SETTINGS = load_settings(env_file=None, environ={}).replace(counts_per_mv=CPM)
# |coefficient| sum of each lead over I/II: its quantisation step in counts.
WEIGHT = {"III": 2, "aVR": 1, "aVL": 1.5, "aVF": 1.5}


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() points the root logger at this test's captured stderr; put it back after."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def _align(sent: np.ndarray, got: np.ndarray) -> int:
    """The one offset into the looped stream where the captured counts match exactly."""
    n = len(sent)
    hits = [o for o in range(n) if np.array_equal(sent[(o + np.arange(len(got))) % n], got)]
    assert len(hits) == 1, f"captured counts match the stream at {len(hits)} offsets"
    return hits[0]


@pytest.mark.functional
@pytest.mark.parametrize("name", RECORDS)
def test_each_record_survives_the_link(name, ecg_data_dir, tmp_path, capsys):
    link = tmp_path / "board"
    sim = BoardSimulator(ecg_data_dir / name, link, counts_per_mv=CPM, speed=25, loop=True)
    with sim:
        code = main(["--set", f"ECG_COUNTS_PER_MV={CPM}",
                     "--set", f"STATE_DIR={tmp_path / 'state'}", "capture", "--port", str(link),
                     "--seconds", "10", "--no-upload", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    folder = Path(out[-1])
    doc = json.loads(next(folder.glob("ecg_data_*.json")).read_text())
    assert list(doc["leads"]) == list(LEAD_ORDER) and doc["sampling_rate"] == 500
    assert doc["quality"]["verdict"] == "ok" and doc["quality"]["frames_lost"] == 0
    leads = {k: np.array(v, dtype=np.float64) for k, v in doc["leads"].items()}
    base = np.array(doc["adc"]["baseline"])
    # bit-exact: the counts the simulator sent, recovered from the JSON and adc block
    got = np.rint(np.stack([leads[k] for k in MEASURED_LEADS]).T / STEP + base).astype(int)
    offset = _align(sim.counts.astype(int), got)
    # the source record in microvolts at the same positions, with the same baseline treatment
    rec = read_record(ecg_data_dir / name)
    src = resample(np.stack([rec.lead(k) for k in MEASURED_LEADS]), rec.sampling_rate)
    idx = (offset + np.arange(5000)) % src.shape[1]
    src = src[:, idx]
    src -= np.median(src, axis=1, keepdims=True)
    expect = dict(zip(MEASURED_LEADS, src, strict=True))
    expect.update(derive_leads(expect["I"], expect["II"]))
    for lead in LEAD_ORDER:
        err = np.abs(leads[lead] - expect[lead]).max()
        assert err <= WEIGHT.get(lead, 1) * STEP + 0.5, f"{name} {lead}: off by {err:.2f} uV"
    assert (got >= 0).all() and (MID_SCALE > 0).all()


@pytest.mark.functional
def test_faults_every_arrived_sample_exact_every_lost_one_null(ecg_data_dir, tmp_path):
    link = tmp_path / "board"
    faults = FaultSpec(drop=0.0005, garbage=0.0005, lose=0.001)
    sim = BoardSimulator(ecg_data_dir / "HR06000", link, counts_per_mv=CPM, speed=25,
                         faults=faults, seed=3)
    sim.open()
    reader = SerialReader.from_settings(SETTINGS, str(link)).start(fail_fast=True)
    try:
        sim.start()
        record = capture_record(reader, SETTINGS, seconds=9.5, clock=Clock(check="floor"))
    finally:
        reader.stop()
        sim.stop()
    truth = sim.truth
    assert truth.bytes_discarded == 0 and truth.lost and truth.damaged and truth.garbage_bytes
    bad = truth.lost | truth.damaged
    base = np.array(record.adc.baseline)
    got = np.rint(np.stack([record.samples[LEAD_ORDER.index(k)] for k in MEASURED_LEADS]).T
                  / STEP + base).astype(int)
    # the capture starts at the first frame that arrived after it was asked for
    first = next(o for o in range(len(sim.counts) - 100)
                 if o not in bad and np.array_equal(sim.counts[o].astype(int), got[0]))
    arrived = ~record.missing[0]
    expect_arrived = np.array([(first + k) not in bad for k in range(record.n_samples)])
    assert np.array_equal(arrived, expect_arrived)  # no shift: lost ones exactly where lost
    assert record.quality.frames_lost == int((~expect_arrived).sum())
    base = np.array(record.adc.baseline)
    counts = np.rint(np.stack([record.samples[LEAD_ORDER.index(k)] for k in MEASURED_LEADS]).T
                     / STEP + base).astype(int)
    sent = sim.counts[first : first + record.n_samples].astype(int)
    assert np.array_equal(counts[arrived], sent[arrived])  # bit-exact
    assert (record.samples[:, ~arrived] == 0).all()


@pytest.mark.functional
def test_unplug_and_replug_during_a_capture(ecg_data_dir, tmp_path):
    link = tmp_path / "board"
    speed = 4.0
    sim = BoardSimulator(ecg_data_dir / "HR06002", link, counts_per_mv=CPM, speed=speed,
                         faults=FaultSpec(unplug=(3.0, 2.0)), loop=True)
    sim.open()
    settings = SETTINGS.replace(sampling_rate=500)
    from device_agent.framing import FrameDecoder

    # the simulator runs 10x real time, so arrival timing must count frames at 10x too
    reader = SerialReader(str(link), decoder=FrameDecoder(sampling_rate=500 * speed),
                          retry_min_s=0.02, retry_max_s=0.05).start(fail_fast=True)
    try:
        sim.start()
        record = capture_record(reader, settings, seconds=10, clock=Clock(check="floor"))
        wait_until(lambda: reader.state.reconnects >= 1, timeout=5, what="a reconnect")
    finally:
        reader.stop()
        sim.stop()
    q = record.quality
    assert q.verdict == "rejected" and any("gap" in r for r in q.reasons)
    gap = max(q.gaps, key=lambda g: g.length)
    assert 1500 <= gap.length <= 1700 and 900 <= gap.start <= 1000  # 3 s unplugged at 2 s
    # the frames after the replug are in their own places: the counter (mod 64) and the
    # arrival witness (the multiple of 64) together put them back bit-exact
    arrived = ~record.missing[0]
    base = np.array(record.adc.baseline)
    counts = np.rint(np.stack([record.samples[LEAD_ORDER.index(k)] for k in MEASURED_LEADS]).T
                     / STEP + base).astype(int)
    first = _align(sim.counts.astype(int), counts[:100])
    sent = sim.counts[(first + np.arange(record.n_samples)) % len(sim.counts)].astype(int)
    assert arrived[gap.start + gap.length :].sum() > 1000
    assert np.array_equal(counts[arrived], sent[arrived])


@pytest.mark.functional
def test_rejected_capture_keeps_its_files_and_fails_clearly(ecg_data_dir, tmp_path, capsys):
    link = tmp_path / "board"
    sim = BoardSimulator(ecg_data_dir / "HR06001", link, counts_per_mv=CPM, speed=25,
                         loop=True, faults=FaultSpec(lose=0.02), seed=1)
    with sim:
        code = main(["--set", f"ECG_COUNTS_PER_MV={CPM}",
                     "--set", f"STATE_DIR={tmp_path / 'state'}", "capture", "--port", str(link),
                     "--no-upload", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == CaptureRejected.exit_code
    assert "rejected" in captured.err and "lost" in captured.err
    folder = Path(captured.out.strip().splitlines()[-1])
    doc = json.loads(next(folder.glob("ecg_data_*.json")).read_text())
    assert doc["quality"]["verdict"] == "rejected"
    assert None in doc["leads"]["II"]


def test_bad_port_fails_fast(tmp_path, capsys):
    code = main(["--set", f"STATE_DIR={tmp_path / 'state'}", "capture", "--direct",
                 "--port", str(tmp_path / "nothing-here"), "--seconds", "1"])
    assert code == SerialLinkError.exit_code
    err = capsys.readouterr().err.strip()
    assert "nothing-here" in err and len(err.splitlines()) == 1


def test_fault_spec_parses_and_refuses_nonsense():
    spec = FaultSpec.parse("drop=0.001,garbage=0.0005,lose=0.002,electrode=LA@2-4,"
                           "stall=3@1.5,unplug=5@1")
    assert spec.drop == 0.001 and spec.electrode == (("LA", 2.0, 4.0),)
    assert spec.stall == (3.0, 1.5) and spec.unplug == (5.0, 1.0)
    with pytest.raises(ValueError, match="not understood"):
        FaultSpec.parse("electrode=XX@1-2")


@pytest.mark.functional
def test_simulate_command_ends_even_when_nobody_reads(tmp_path):
    """`simulate --seconds N` with no reader on the pty ends, like a board nobody listens to."""
    import subprocess
    import sys

    link = tmp_path / "tty"
    proc = subprocess.run(
        [sys.executable, "-m", "device_agent", "simulate", "--link", str(link), "--speed", "20",
         "--seconds", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert "sent 1000 frames" in proc.stdout
    assert "unread bytes discarded" in proc.stdout
    assert not link.exists(), "the simulator's link was left behind"


def test_simulate_names_a_missing_record(tmp_path, capsys):
    code = main(["simulate", "--record",
                 str(tmp_path / "nope"), "--link", str(tmp_path / "tty")])
    assert code == 2
    err = capsys.readouterr().err
    assert "nope.hea" in err and len(err.strip().splitlines()) == 1
