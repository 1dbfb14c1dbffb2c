"""delineate.Conf: the delineator's thresholds as one frozen, validated object (issue 24)."""

from __future__ import annotations

import dataclasses

import pytest

from device_agent.clinical import delineate
from device_agent.clinical.delineate import DEFAULT_CONF, Conf
from device_agent.clinical.measurements import measure_record
from device_agent.lab import ludb
from tests.conftest import REPO

LUDB = REPO / "tests" / "data" / "ludb"


def test_defaults_are_the_module_constants():
    c = Conf()
    assert c == DEFAULT_CONF
    assert (c.qrs_core, c.qrs_edge, c.p_edge, c.t_edge, c.guide_s) == (
        delineate.QRS_CORE, delineate.QRS_EDGE, delineate.P_EDGE, delineate.T_EDGE,
        delineate.GUIDE_S)
    for name, ms in delineate.CALIBRATION_MS.items():
        assert c.calibration(name) == ms


def test_it_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_CONF.p_edge = 0.3  # type: ignore[misc]


@pytest.mark.parametrize(("changes", "message"), [
    ({"qrs_core": 1.5}, "qrs_core is a fraction"),
    ({"p_edge": 0.0}, "p_edge is a fraction"),
    ({"t_smooth_s": -0.01}, "t_smooth_s is seconds"),
    ({"p_width_s": 2.0}, "p_width_s is seconds"),
    ({"t_offset_ms": 80.0}, "calibration shift"),
    ({"p_min_uv": -1.0}, "p_min_uv is microvolts"),
    ({"low_pass_hz": 2.0}, "low_pass_hz must be 5-150"),
    ({"qrs_edge": 0.5}, "edge fraction must be under its core"),
    ({"p_width_s": 0.33}, "must fit the P search"),
    ({"t_start_s": 0.5}, "must be before"),
    ({"guide_s": float("nan")}, "finite number"),
    ({"p_core": True}, "finite number"),
])
def test_a_value_out_of_its_range_is_refused_naming_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        Conf(**changes)
    with pytest.raises(ValueError, match=message):
        DEFAULT_CONF.replace(**changes)


def test_measure_record_runs_with_the_conf_it_is_given():
    record = ludb.load_record(LUDB, 3)
    base = measure_record(record)
    assert measure_record(record, conf=Conf()) == base
    later = measure_record(record, conf=DEFAULT_CONF.replace(qrs_onset_ms=-20.0))
    assert later.qrs_ms == pytest.approx((base.qrs_ms or 0) + 12.0, abs=2.0)
    assert later.qt_ms == pytest.approx((base.qt_ms or 0) + 12.0, abs=2.0)
    assert later.heart_rate_bpm == base.heart_rate_bpm
