"""The fault proxy's "http" mode, which the crash campaign kills through: relay and traps.

A boto3 client on the agent's own transport talks to moto through the proxy: every S3 call
is relayed whole, request by request (moto answers "Connection: close", which the proxy
honours), and a trap acts on exactly the PUT it was set for, before S3 sees it or after S3
stored it, never on any other.
"""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import urlparse

import boto3
import pytest
from botocore import exceptions as bx
from botocore.config import Config

from device_agent.shipping import transport
from device_agent.shipping.deadline import Deadlines
from tests.faultproxy import BEFORE_ANSWER, BEFORE_FORWARD, FaultProxy

pytestmark = pytest.mark.functional


def _s3(endpoint: str) -> Any:
    config = Config(retries={"mode": "standard", "total_max_attempts": 1},
                    connect_timeout=2, read_timeout=5)
    client = boto3.session.Session().client("s3", endpoint_url=endpoint,
                                            region_name="us-east-1", config=config)
    transport.install(client, Deadlines(connect_timeout_s=2, read_timeout_s=5))
    return client


def _exists(client: Any, bucket: str, key: str) -> bool:
    try:
        client.head_object(Bucket=bucket, Key=key)
    except bx.ClientError:
        return False
    return True


def test_http_mode_relays_every_call(s3_endpoint: str, s3_bucket: str,
                                                               s3_env: dict[str, str]) -> None:
    with FaultProxy(int(urlparse(s3_endpoint).port or 0)) as proxy:
        proxy.set_mode("http")
        client = _s3(proxy.url)
        large = bytes(range(256)) * 4096  # 1 MiB, several reads on both sides
        for key, body in (("http/a.json", b"{}"), ("http/b.pdf", large)):
            client.put_object(Bucket=s3_bucket, Key=key, Body=body)
            assert client.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == body
            assert client.head_object(Bucket=s3_bucket, Key=key)["ContentLength"] == len(body)
        listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="http/")["Contents"]
        assert [o["Key"] for o in listed] == ["http/a.json", "http/b.pdf"]
        assert not _exists(client, s3_bucket, "http/none")  # a 404 to a HEAD: no body
        assert proxy.counts["http_requests"] == 8
        assert not proxy.sprung


@pytest.mark.parametrize("when", [BEFORE_FORWARD, BEFORE_ANSWER])
def test_trap_acts_on_the_nth_put_only(s3_endpoint: str, s3_bucket: str, s3_env: dict[str, str],
                                       when: str) -> None:
    direct = _s3(s3_endpoint)
    acted: list[str] = []
    with FaultProxy(int(urlparse(s3_endpoint).port or 0)) as proxy:
        proxy.set_mode("http")
        client = _s3(proxy.url)
        proxy.arm(when, nth=2, action=acted.append)
        client.put_object(Bucket=s3_bucket, Key="trap/1", Body=b"one")
        client.get_object(Bucket=s3_bucket, Key="trap/1")  # not a PUT: not counted
        with pytest.raises(bx.HTTPClientError):  # the connection closes unanswered
            client.put_object(Bucket=s3_bucket, Key="trap/2", Body=b"two")
        client.put_object(Bucket=s3_bucket, Key="trap/3", Body=b"three")  # disarmed
        sprung = list(proxy.sprung)
    assert [line.split(" ")[:2] for line in acted] == [["PUT", f"/{s3_bucket}/trap/2"]]
    assert [(s.when, s.status) for s in sprung] == [
        (when, 200 if when == BEFORE_ANSWER else None)]
    assert _exists(direct, s3_bucket, "trap/1") and _exists(direct, s3_bucket, "trap/3")
    # before forwarding S3 never saw the put; before the answer it had stored it whole
    stored = _exists(direct, s3_bucket, "trap/2")
    assert stored == (when == BEFORE_ANSWER)
    if stored:
        body = direct.get_object(Bucket=s3_bucket, Key="trap/2")["Body"].read()
        assert hashlib.sha256(body).digest() == hashlib.sha256(b"two").digest()
