"""One deadline formula (deadline.py): the body at S3_MIN_RATE_KBPS, never past the cap."""

from __future__ import annotations

from device_agent.core.config import load_settings
from device_agent.ops.status import collect_status
from device_agent.shipping.deadline import BACKOFF_CAP_S, MIB, Deadlines


def test_a_request_gets_its_body_at_the_minimum_rate_up_to_the_cap():
    d = Deadlines(connect_timeout_s=5, read_timeout_s=25, min_rate_bps=16 * 1024,
                  max_body_bytes=64 * MIB, attempts=3)
    assert (d.request_s(0), d.request_s(16 * 1024 * 10)) == (30.0, 40.0)
    assert d.cap_s == 30 + 64 * MIB / (16 * 1024)
    # a 3 GB answer, or a body past the largest the agent sends, buys no more than the cap
    assert d.request_s(3 * 10**9) == d.request_s(10**15) == d.cap_s
    assert d.put_total_s(MIB) == 3 * (d.request_s(MIB) + BACKOFF_CAP_S)


def test_the_settings_decide_it_and_status_shows_the_same_numbers(tmp_path):
    env = {"STATE_DIR": str(tmp_path / "state"), "S3_CONNECT_TIMEOUT_S": "2",
           "S3_READ_TIMEOUT_S": "8", "S3_MIN_RATE_KBPS": "64", "S3_MAX_ATTEMPTS": "2",
           "REPORT_MAX_MB": "10", "CLOUD_UPLOAD_ENABLED": "false"}
    settings = load_settings(env_file=None, environ={}, overrides=env)
    d = Deadlines.from_settings(settings)
    assert (d.base_s, d.min_rate_bps, d.max_body_bytes, d.attempts) == (
        10.0, 64 * 1024.0, 11 * MIB, 2)
    assert d.request_s(MIB) == 10 + 16  # 1 MiB at 64 KiB/s
    shown = collect_status(settings)["deadlines"]
    assert shown == d.describe()
    assert (shown["request_s"], shown["per_mib_s"], shown["cap_s"]) == (10.0, 16.0, 186.0)
