"""A restart during a capture: the spool says the capture was kept, and which record, when it
was; "capture again" only when it left nothing (issue 22 item 5)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest

from device_agent.capture import (
    PackageEncoders,
    find_capture,
    hold_record,
    kept_answer,
    measure_once,
    package_and_decide,
)
from device_agent.core.clock import HoldTicket, boot_id
from device_agent.documents.package import build_package, decide
from device_agent.ops.spool import NOTHING_KEPT, Request, Spool, record_id_for
from device_agent.shipping.outbox import Outbox
from tests.campaigns.agent_process import make_record, settings_for
from tests.helpers import present

PATIENT = {"first_name": "Synthetic", "last_name": "Kowalczyk-Recover", "age": 50,
           "gender": "F", "patient_id": "SYN-778812"}
IDENTITY = ("Synthetic", "Kowalczyk", "SYN-778812")


class Cut(Exception):
    """Stands for the process dying at a checkpoint."""


def _claimed(settings) -> tuple[Spool, Request, str]:
    spool = Spool(settings.state_dir).ensure()
    request = spool.submit(seconds=1.0, patient=PATIENT, no_upload=False, timeout_s=60)
    assert spool.claim() == request
    return spool, request, record_id_for(request.id)


def _record(settings, record_id: str):
    record = make_record(1, settings.device_serial)
    return measure_once(dataclasses.replace(record, record_id=record_id),
                        mains_hz=settings.mains_hz)


def _recover(settings, outbox, spool: Spool, request: Request) -> dict[str, Any]:
    def kept(rid: str):
        found = find_capture(settings, outbox, rid)
        return None if found is None else kept_answer(found)

    assert Spool(settings.state_dir).recover(kept) == 1
    answer = spool.wait(request, timeout_s=1)
    text = json.dumps(answer)
    for part in IDENTITY:
        assert part not in text, f"the answer shows the patient: {text}"
    return answer


@pytest.fixture
def unit(tmp_path: Path):
    settings = settings_for(tmp_path / "state", "http://127.0.0.1:9", "b")
    with Outbox.open(settings) as outbox:
        yield settings, outbox


def test_queued_package_is_answered_kept_with_its_record(unit):
    settings, outbox = unit
    spool, request, rid = _claimed(settings)
    outcome = package_and_decide(_record(settings, rid), PATIENT, settings, outbox,
                                 out_root=Path(settings.state_dir) / "records", withheld=False)
    answer = _recover(settings, outbox, spool, request)
    assert answer["ok"] is True and answer["exit_code"] == 0 and answer["recovered"]
    assert answer["record_id"] == rid and answer["stamp"] == present(outcome.info).stamp
    assert answer["state"] == "queued" and answer["queued"] and not answer["delivered"]
    assert "capture again" not in json.dumps(answer)
    assert f"kept as record {rid} ({present(outcome.info).stamp})" in answer["warnings"][0]


def test_uploaded_package_is_answered_kept_and_uploaded(unit):
    settings, outbox = unit
    spool, request, rid = _claimed(settings)
    outcome = package_and_decide(_record(settings, rid), PATIENT, settings, outbox,
                                 out_root=Path(settings.state_dir) / "records", withheld=False)
    for item in outbox.items.of_package(str(present(outcome.info).folder.resolve())):
        outbox.items.mark_delivered(item.id, etag='"e"', final_key=item.key, outcome="created")
    answer = _recover(settings, outbox, spool, request)
    assert answer["ok"] and answer["state"] == "delivered" and answer["delivered"]
    warning = answer["warnings"][0]
    assert "uploaded" in warning and present(outcome.info).stamp in warning


def test_manifest_written_not_yet_queued_is_kept(unit):
    settings, outbox = unit
    spool, request, rid = _claimed(settings)
    record = _record(settings, rid)
    info = build_package(record, PATIENT, Path(settings.state_dir) / "records",
                         device_serial=settings.device_serial,
                         encoders=PackageEncoders(settings),
                         disposition=decide(record, withheld=False))
    assert outbox.stats().pending == 0  # the crash came before the queue
    answer = _recover(settings, outbox, spool, request)
    assert answer["ok"] and answer["record_id"] == rid and answer["stamp"] == info.stamp
    assert answer["state"] == "queued"


def test_held_record_is_kept_until_the_clock_names_it(unit):
    settings, outbox = unit
    spool, request, rid = _claimed(settings)
    hold_record(settings, _record(settings, rid), PATIENT,
                HoldTicket(time.monotonic(), boot_id(), 3600.0),
                out_root=Path(settings.state_dir) / "records", withheld=False)
    answer = _recover(settings, outbox, spool, request)
    assert answer["ok"] and answer["held"] and answer["record_id"] == rid
    assert answer["stamp"] is None and "held until the clock" in answer["warnings"][0]


def test_a_package_cut_before_its_manifest_says_capture_again(unit):
    settings, outbox = unit
    spool, request, rid = _claimed(settings)

    def cut(name: str) -> None:
        if name == "package.before_manifest":
            raise Cut(name)

    with pytest.raises(Cut):
        package_and_decide(_record(settings, rid), PATIENT, settings, outbox,
                           out_root=Path(settings.state_dir) / "records", withheld=False,
                           checkpoint=cut)
    assert list((Path(settings.state_dir) / "records").iterdir()), "the remains are there"
    answer = _recover(settings, outbox, spool, request)
    assert answer == {"ok": False, "exit_code": 1, "error": NOTHING_KEPT}


def test_a_capture_that_left_nothing_says_capture_again(unit):
    settings, outbox = unit
    spool, request, _rid = _claimed(settings)
    # another capture's package is there: it is not this request's
    package_and_decide(_record(settings, record_id_for("another-request")), PATIENT, settings,
                       outbox, out_root=Path(settings.state_dir) / "records", withheld=False)
    answer = _recover(settings, outbox, spool, request)
    assert answer == {"ok": False, "exit_code": 1, "error": NOTHING_KEPT}
    assert "capture again" in NOTHING_KEPT


def test_a_rejected_capture_names_its_record_and_says_capture_again(unit):
    settings, outbox = unit
    spool, request, rid = _claimed(settings)
    record = _record(settings, rid)
    quality = dataclasses.replace(record.quality, verdict="rejected",
                                  reasons=("lead II flat",))
    outcome = package_and_decide(dataclasses.replace(record, quality=quality), PATIENT,
                                 settings, outbox,
                                 out_root=Path(settings.state_dir) / "records", withheld=False)
    answer = _recover(settings, outbox, spool, request)
    assert answer["ok"] is False and answer["exit_code"] == 1
    assert answer["record_id"] == rid and answer["stamp"] == present(outcome.info).stamp
    assert "rejected (lead II flat)" in answer["error"] and "capture again" in answer["error"]


def test_a_failed_look_up_does_not_stop_the_start_and_says_check_first(unit):
    settings, _outbox = unit
    spool, request, _rid = _claimed(settings)

    def broken(rid: str):
        raise RuntimeError("database disk image is malformed")

    assert Spool(settings.state_dir).recover(broken) == 1
    answer = spool.wait(request, timeout_s=1)
    assert answer["ok"] is False and "cannot tell whether it was kept" in answer["error"]
    assert "queue list" in answer["error"]


def test_a_held_withheld_record_is_not_promised_an_upload(unit):
    settings, outbox = unit
    spool, request, rid = _claimed(settings)
    hold_record(settings, _record(settings, rid), PATIENT,
                HoldTicket(time.monotonic(), boot_id(), 3600.0),
                out_root=Path(settings.state_dir) / "records", withheld=True)
    answer = _recover(settings, outbox, spool, request)
    assert answer["ok"] and answer["held"] and not answer["queued"]
    assert "not uploaded" in answer["warnings"][0] and "queued" not in answer["warnings"][0]
