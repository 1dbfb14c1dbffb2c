"""Every request ends: the deadline session under boto3 (and the bounded fetch), against real
servers on 127.0.0.1.

S3 parity runs against moto's HTTP server; the faults (a dripping, endless or huge answer, a
captive portal, conflicting lengths, an interim answer, a server that never answers, a
refused port, a dripping proxy) come from tests/faultproxy.py in front of it; the HTTP
details (chunked answers, SNI) from a small http.server on a thread. The endless, huge and
dripping answers run in a child process that reports its peak RSS (transport_probe.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import boto3
import pytest
from botocore import exceptions as bx
from botocore.config import Config

from device_agent.core.errors import UploadError
from device_agent.shipping import transport
from device_agent.shipping.deadline import Deadlines
from device_agent.shipping.uploader import Uploader, classify_error
from tests.conftest import wait_until
from tests.faultproxy import PORTAL_HTML, FaultProxy
from tests.helpers import present
from tests.pki import TestCA

pytestmark = pytest.mark.functional


def _s3(endpoint: str, *, attempts: int = 1, read_timeout: float = 5.0, **client_args):
    """A boto3 S3 client of its own session (so moto's import order does not matter)."""
    config = Config(retries={"mode": "standard", "total_max_attempts": attempts},
                    connect_timeout=2, read_timeout=read_timeout)
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                          config=config, **client_args)


def _port(url: str) -> int:
    return int(urlparse(url).port or 0)


# --- S3 parity --------------------------------------------------------------------------------

def _exercise(client, bucket: str, prefix: str) -> dict:
    """Put, get, head, list and delete; return what a caller would see, keys made relative."""
    small = b'{"leads": [1, 2, 3]}'
    large = bytes(range(256)) * 8192  # 2 MiB: botocore adds "Expect: 100-continue"
    seen: dict = {}
    for name, body in (("small.json", small), ("large.pdf", large)):
        key = f"{prefix}/{name}"
        put = client.put_object(Bucket=bucket, Key=key, Body=body, Metadata={"sha": "x"},
                                ContentType="application/octet-stream",
                                ChecksumAlgorithm="SHA256")
        got = client.get_object(Bucket=bucket, Key=key)
        head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        seen[name] = {
            "put_etag": put["ETag"], "put_sha": put["ChecksumSHA256"],
            "body_sha": hashlib.sha256(got["Body"].read()).hexdigest(),
            "head": (head["ContentLength"], head["ETag"], head["Metadata"],
                     head["ChecksumSHA256"], head["ContentType"]),
        }
    listing = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/")
    seen["list"] = sorted((o["Key"].split("/", 1)[1], o["Size"], o["ETag"])
                          for o in listing["Contents"])
    with pytest.raises(bx.ClientError) as missing:
        client.head_object(Bucket=bucket, Key=f"{prefix}/missing")
    seen["missing"] = missing.value.response["ResponseMetadata"]["HTTPStatusCode"]
    client.delete_object(Bucket=bucket, Key=f"{prefix}/small.json")
    seen["after_delete"] = [o["Key"].split("/", 1)[1] for o in client.list_objects_v2(
        Bucket=bucket, Prefix=f"{prefix}/").get("Contents", [])]
    return seen


def _bounded(endpoint: str, *, attempts: int = 1, read_timeout: float = 5.0,
             deadline_s: float = 30.0, **client_args):
    """A client of _s3's whose requests get `deadline_s` (plus their body at 16 KiB/s)."""
    client = _s3(endpoint, attempts=attempts, read_timeout=read_timeout, **client_args)
    session = transport.install(client, Deadlines(connect_timeout_s=min(1.0, deadline_s / 2),
                                                  read_timeout_s=deadline_s - min(1.0,
                                                                                  deadline_s / 2)))
    return client, session


def test_s3_calls_through_the_session_match_botocores_own(s3_endpoint, s3_bucket):
    plain = _s3(s3_endpoint)
    bounded, session = _bounded(s3_endpoint)
    expected = _exercise(plain, s3_bucket, "plain")
    assert _exercise(bounded, s3_bucket, "bounded") == expected
    assert expected["missing"] == 404 and expected["after_delete"] == ["large.pdf"]
    assert session.requests == 10  # every call above went through the deadline session


def test_uploader_conditional_puts_work_through_the_session(s3_endpoint, s3_bucket):
    client, _ = _bounded(s3_endpoint)
    uploader = Uploader(client, bucket=s3_bucket)
    body = b"%PDF-1.4 synthetic report"
    sha = hashlib.sha256(body).hexdigest()
    first = uploader.put_new("ecg-reports/a.pdf", body, sha256=sha, metadata={},
                             content_type="application/pdf")
    again = uploader.put_new("ecg-reports/a.pdf", body, sha256=sha, metadata={},
                             content_type="application/pdf")
    assert (first.outcome, again.outcome) == ("created", "already_delivered")  # 412 path
    assert present(uploader.head("ecg-reports/a.pdf")).sha256 == sha


def test_moto_in_process_mock_keeps_answering(monkeypatch):
    from moto import mock_aws

    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "HTTPS_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(key, raising=False)
    with mock_aws():
        client = boto3.session.Session().client("s3", region_name="us-east-1")
        session = transport.install(client, Deadlines())
        client.create_bucket(Bucket="mocked")
        client.put_object(Bucket="mocked", Key="k", Body=b"v")
        assert client.get_object(Bucket="mocked", Key="k")["Body"].read() == b"v"
    assert session.requests == 0  # moto answered before botocore reached its HTTP session


def test_config_read_timeout_and_pool_size_still_apply(s3_endpoint, s3_bucket):
    with FaultProxy(_port(s3_endpoint)) as proxy:
        proxy.set_mode("blackhole")
        client = boto3.session.Session().client(
            "s3", endpoint_url=proxy.url, region_name="us-east-1",
            config=Config(retries={"mode": "standard", "total_max_attempts": 1},
                          connect_timeout=1, read_timeout=0.5, max_pool_connections=3))
        session = transport.install(client, Deadlines(connect_timeout_s=1, read_timeout_s=60))
        with pytest.raises(bx.ReadTimeoutError) as info:
            client.put_object(Bucket=s3_bucket, Key="cfg/a.json", Body=b"{}")
        wait_until(lambda: proxy.counts["client_gone"] >= 1, what="the client to hang up")
    # the 0.5 s per-read timeout fired, long before the 61 s deadline
    assert "read timeout=0.5" in str(info.value.kwargs["error"])
    assert session._manager.connection_pool_kw["maxsize"] == 3


def test_s3_over_https_with_a_ca_file(tmp_path, s3_endpoint, s3_bucket):
    ca = TestCA(tmp_path / "pki")
    server = ca.issue("s3.local", server=True)
    with FaultProxy(_port(s3_endpoint), server_context=ca.server_context(server)) as front:
        trusted, _ = _bounded(front.url, verify=str(ca.cert_file))
        trusted.put_object(Bucket=s3_bucket, Key="tls/a", Body=b"over tls")
        assert trusted.get_object(Bucket=s3_bucket, Key="tls/a")["Body"].read() == b"over tls"

        untrusted, _ = _bounded(front.url)  # system store: the test CA is unknown
        with pytest.raises(bx.SSLError) as info:
            untrusted.put_object(Bucket=s3_bucket, Key="tls/b", Body=b"x")
        assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)


# --- faults -----------------------------------------------------------------------------------

def test_dripping_answer_is_cut_at_the_deadline(s3_endpoint, s3_bucket):
    with FaultProxy(_port(s3_endpoint), drip_interval_s=0.5) as proxy:
        proxy.set_mode("drip")
        client, _ = _bounded(proxy.url, read_timeout=10, deadline_s=2.0)
        with pytest.raises(bx.ReadTimeoutError) as info:
            client.put_object(Bucket=s3_bucket, Key="drip/a.json", Body=b"{}")
        wait_until(lambda: proxy.counts["client_gone"] >= 1, what="the client to hang up")
        # the whole answer reached the proxy; the client gave up part way through it
        assert 0 < proxy.counts["drip_bytes"] < proxy.counts["drip_answer_bytes"]
    error = classify_error(info.value, bucket=s3_bucket, key="drip/a.json")
    assert (error.retryable, error.code) == (True, "Timeout")
    # botocore sends the body after S3's "100 Continue", which was dripped too (25 bytes at
    # 2 bytes/s): the deadline passed before it, so nothing was written
    with pytest.raises(bx.ClientError):
        _s3(s3_endpoint).head_object(Bucket=s3_bucket, Key="drip/a.json")


def test_per_read_timeouts_alone_let_a_drip_run_on(s3_endpoint, s3_bucket):
    """Why this module exists: botocore's read_timeout=1 never fires on a 4 bytes/s drip."""
    with FaultProxy(_port(s3_endpoint), drip_interval_s=0.25) as proxy:
        proxy.set_mode("drip")
        client = _s3(proxy.url, read_timeout=1.0)
        outcome: list[BaseException] = []

        def put() -> None:
            try:
                client.put_object(Bucket=s3_bucket, Key="drip/b.json", Body=b"{}")
            except BaseException as exc:  # the proxy closing ends it
                outcome.append(exc)

        worker = threading.Thread(target=put, name="plain-put")
        worker.start()
        wait_until(lambda: proxy.counts["drip_bytes"] >= 12, what="3 s of dripping")
        assert worker.is_alive() and not outcome  # 3x read_timeout, still waiting
        proxy.set_mode("reset")  # drops the connection
        worker.join(timeout=10)
    assert not worker.is_alive() and outcome


def test_retry_after_a_timeout_opens_a_new_connection(s3_endpoint, s3_bucket):
    with FaultProxy(_port(s3_endpoint), drip_interval_s=0.5) as proxy:
        proxy.set_mode("drip")
        client, _ = _bounded(proxy.url, attempts=2, deadline_s=1.0)
        with pytest.raises(bx.ReadTimeoutError):
            client.put_object(Bucket=s3_bucket, Key="drip/c.json", Body=b"{}")
        wait_until(lambda: proxy.counts["client_gone"] >= 2, what="both attempts to hang up")
        assert proxy.counts["accepted"] == 2  # the timed-out connection was not reused
        proxy.set_mode("pass")
        client.put_object(Bucket=s3_bucket, Key="drip/d.json", Body=b"{}")
        assert proxy.counts["accepted"] == 3


def test_captive_portal_page_reaches_botocore_intact(s3_endpoint, s3_bucket):
    with FaultProxy(_port(s3_endpoint)) as proxy:
        proxy.set_mode("portal")
        client, _ = _bounded(proxy.url)
        answers: list[dict] = []

        def capture(response_dict: dict, **_: object) -> None:
            answers.append(response_dict)

        client.meta.events.register("before-parse.s3.PutObject", capture)
        result = client.put_object(Bucket=s3_bucket, Key="portal/a.json", Body=b"{}")
        got = client.get_object(Bucket=s3_bucket, Key="portal/a.json")
        assert got["Body"].read() == PORTAL_HTML
        assert proxy.counts["portals"] == 2
    assert result["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert "ETag" not in result  # nothing proves S3 stored it: the uploader must refuse this
    (answer,) = answers
    assert answer["status_code"] == 200 and answer["body"] == PORTAL_HTML
    assert answer["headers"]["content-type"].startswith("text/html")


def test_server_that_never_answers(s3_endpoint, s3_bucket, tmp_path):
    with FaultProxy(_port(s3_endpoint)) as proxy:
        proxy.set_mode("blackhole")
        client, _ = _bounded(proxy.url, deadline_s=1.5)
        with pytest.raises(bx.ReadTimeoutError):
            client.put_object(Bucket=s3_bucket, Key="hole/a.json", Body=b"{}")
        wait_until(lambda: proxy.counts["client_gone"] >= 1, what="the client to hang up")

    ca = TestCA(tmp_path / "pki")
    context = ca.server_context(ca.issue("s3.local", server=True))
    with FaultProxy(_port(s3_endpoint), server_context=context) as proxy:
        proxy.set_mode("blackhole")  # accepts TCP, never starts TLS
        client, _ = _bounded(proxy.url, deadline_s=1.5, verify=str(ca.cert_file))
        with pytest.raises((bx.ConnectTimeoutError, bx.ReadTimeoutError)) as info:
            client.put_object(Bucket=s3_bucket, Key="hole/b.json", Body=b"{}")
        wait_until(lambda: proxy.counts["client_gone"] >= 1, what="the client to hang up")
    assert classify_error(info.value, bucket=s3_bucket, key="hole/b.json").code == "Timeout"


def test_refused_port(s3_endpoint, s3_bucket):
    with FaultProxy(_port(s3_endpoint)) as proxy:
        proxy.set_mode("refuse")
        client, _ = _bounded(proxy.url)
        with pytest.raises(bx.EndpointConnectionError) as info:
            client.put_object(Bucket=s3_bucket, Key="refused/a.json", Body=b"{}")
    error = classify_error(info.value, bucket=s3_bucket, key="refused/a.json")
    assert (error.retryable, error.code) == (True, "ConnectionError")


def test_the_deadline_holds_through_an_https_proxy(tmp_path, s3_endpoint, s3_bucket,
                                                   monkeypatch):
    ca = TestCA(tmp_path / "pki")
    context = ca.server_context(ca.issue("s3.local", server=True))
    for key in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(key, raising=False)
    with FaultProxy(_port(s3_endpoint), server_context=context) as tls, \
            FaultProxy(tls.port, drip_interval_s=0.05) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
        proxy.set_mode("tunnel")
        client, _ = _bounded(tls.url, deadline_s=2.0, verify=str(ca.cert_file))
        client.put_object(Bucket=s3_bucket, Key="proxy/a.json", Body=b"{}")
        assert proxy.counts["tunnels"] == 1  # the request went through the proxy
        proxy.set_mode("tunnel-drip")  # the TLS handshake and all after it, 20 bytes/s
        with pytest.raises((bx.ReadTimeoutError, bx.ConnectTimeoutError)):
            client.put_object(Bucket=s3_bucket, Key="proxy/b.json", Body=b"{}")
        wait_until(lambda: proxy.counts["client_gone"] >= 1, what="the client to hang up")
        # the handshake alone would take over a minute at that rate: the deadline cut it
        assert 0 < proxy.counts["drip_bytes"] < 2.0 / 0.05 + 20


def test_name_resolution_is_bounded():
    release = threading.Event()

    def never_answers(*args: object) -> list:
        release.wait(30)
        return []

    try:
        with pytest.raises(TimeoutError, match=r"name resolution of s3\.example\.test"):
            transport.resolve("s3.example.test", 443, 0.2, getaddrinfo=never_answers)
    finally:
        release.set()


def test_two_different_content_lengths_are_not_a_delivery(s3_endpoint, s3_bucket):
    with FaultProxy(_port(s3_endpoint)) as proxy:
        proxy.set_mode("conflict")
        client, _ = _bounded(proxy.url)
        uploader = Uploader(client, bucket=s3_bucket)
        body = b"%PDF conflict"
        with pytest.raises(UploadError) as info:
            uploader.put_new("ecg-reports/c.pdf", body, sha256=hashlib.sha256(body).hexdigest(),
                             metadata={}, content_type="application/pdf")
    assert info.value.retryable and info.value.scope == "queue"
    assert "multiple unmatching values" in str(info.value.__cause__)


def test_an_interim_answer_with_an_etag_is_not_the_final_one(s3_endpoint, s3_bucket):
    with FaultProxy(_port(s3_endpoint)) as proxy:
        proxy.set_mode("interim")
        client, _ = _bounded(proxy.url)
        answers: list[int] = []
        client.meta.events.register("before-parse.s3.PutObject",
                                    lambda response_dict, **_: answers.append(
                                        response_dict["status_code"]))
        uploader = Uploader(client, bucket=s3_bucket)
        body = b"%PDF interim"
        with pytest.raises(UploadError) as info:
            uploader.put_new("ecg-reports/i.pdf", body, sha256=hashlib.sha256(body).hexdigest(),
                             metadata={}, content_type="application/pdf")
    assert answers == [200]  # the portal's page, not the "103" with its ETag and SHA-256
    assert info.value.code == "Unproven"


def test_a_download_may_take_as_long_as_its_body_at_the_minimum_rate(s3_endpoint, s3_bucket):
    body = bytes(range(256)) * 192  # 48 KiB, paced at 16 KiB/s: about 3 s
    _s3(s3_endpoint).put_object(Bucket=s3_bucket, Key="paced/a.bin", Body=body)
    with FaultProxy(_port(s3_endpoint), pace_bps=16 * 1024) as proxy:
        proxy.set_mode("pace")
        for rate, completes in ((1 << 20, False), (8 * 1024, True)):
            client = _s3(proxy.url)
            # 1.5 s for a request; the 48 KiB body adds 0.05 s at 1 MiB/s, 6 s at 8 KiB/s
            transport.install(client, Deadlines(connect_timeout_s=0.5, read_timeout_s=1.0,
                                                min_rate_bps=rate))
            if completes:
                got = client.get_object(Bucket=s3_bucket, Key="paced/a.bin")["Body"].read()
                assert got == body
            else:
                with pytest.raises(bx.ReadTimeoutError):
                    client.get_object(Bucket=s3_bucket, Key="paced/a.bin")["Body"].read()


# --- the answers that must end: endless, huge, dripping; in a child process -------------------

def _probe(case: str, url: str, *extra: str) -> dict:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    for key in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-m", "tests.functional.transport_probe", case, url,
                           *extra], capture_output=True, text=True, timeout=120, env=env,
                          cwd=Path(__file__).resolve().parents[2], check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# a loaded 2-core machine runs several suites at once: "ends" is checked against the deadline
# with room to spare; what the issue measured was 90 s for a 10 s deadline
_SLACK_S = 5.0
_RSS_MB = 150


@pytest.mark.parametrize("mode, case, outcome, code", [
    ("endless", "put", "AnswerTooLarge", None),
    ("huge", "put", "AnswerTooLarge", None),
    ("endless", "get", "AnswerTooLarge", None),
    ("huge", "get", "AnswerTooLarge", None),
    ("endless", "verify-get", "UploadError", "AnswerTooLarge"),
    ("drip", "put", "ReadTimeoutError", None),
    ("drip", "get", "ReadTimeoutError", None),
])
def test_every_answer_ends_within_its_deadline_and_memory(s3_endpoint, mode, case, outcome,
                                                         code):
    with FaultProxy(_port(s3_endpoint), drip_interval_s=0.2) as proxy:
        proxy.set_mode(mode)
        result = _probe(case, proxy.url)
        wait_until(lambda: proxy.counts["client_gone"] >= 1,
                   what="the client to hang up")
    assert (result["outcome"], result["code"]) == (outcome, code), result
    assert result["elapsed_s"] <= result["cap_s"] + 1 + _SLACK_S, result
    assert result["peak_rss_mb"] < _RSS_MB, result
    # what was sent is bounded by the answer's limit (8 MiB + 64 KiB for a download) plus
    # what the kernel's socket buffers hold; the issue saw 399-589 MB and 3 GB
    assert proxy.counts["junk_bytes"] < (9 << 20) + (32 << 20), proxy.counts


def test_a_huge_credentials_answer_ends_bounded(tmp_path):
    ca = TestCA(tmp_path / "pki")
    device = ca.issue("SN-PROBE")
    context = ca.server_context(ca.issue("iot.local", server=True))
    with FaultProxy(1, server_context=context) as provider:
        provider.set_mode("huge")  # 200 OK, Content-Length 3 GB, junk at full speed
        result = _probe("credentials", provider.url, str(ca.cert_file), str(device.cert_file),
                        str(device.key_file))
        wait_until(lambda: provider.counts["client_gone"] >= 1, what="the client to hang up")
    assert (result["outcome"], result["code"]) == ("UploadError", "MalformedCredentials"), result
    assert result["peak_rss_mb"] < _RSS_MB, result
    assert result["elapsed_s"] <= result["deadline_s"] + 1 + _SLACK_S, result
    assert provider.counts["junk_bytes"] < 32 << 20


# --- HTTP details on a small local server -----------------------------------------------------

class _Server(ThreadingHTTPServer):
    """The test server, with what the handler counts and the stop its slow answers watch."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.connections = 0
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve_forever,
                                       kwargs={"poll_interval": 0.05}, name="test-http-server")

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client hanging up is no news


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _answer(self, body: bytes, *, close: bool = False) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_PUT(self) -> None:
        body = self._body()
        self.server.requests.append((dict(self.headers), body))
        self._answer(hashlib.sha256(body).hexdigest().encode())

    def do_GET(self) -> None:
        stop = self.server.stop
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (b"first,", b"second,", b"x" * 70000):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/slow":  # 64000 bytes in 8 pieces, 0.2 s apart
            self.send_response(200)
            self.send_header("Content-Length", "64000")
            self.end_headers()
            for _ in range(8):
                self.wfile.write(b"s" * 8000)
                self.wfile.flush()
                if stop.wait(0.2):
                    return
        elif self.path == "/lying":  # announces 1 GB, drips a byte every 0.1 s
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            while not stop.wait(0.1):
                try:
                    self.wfile.write(b"d")
                    self.wfile.flush()
                except OSError:
                    return
        elif self.path == "/close":
            self._answer(b"bye", close=True)
        else:
            self._answer(b"hello")


@pytest.fixture
def http_server(request) -> Iterator[_Server]:
    """A keep-alive HTTP/1.1 server on 127.0.0.1; `server.tls` may wrap it before use."""
    server = _Server(_Handler)
    yield server
    server.stop.set()
    if server.thread.is_alive():
        server.shutdown()
    server.server_close()


def _start(server: _Server) -> str:
    server.thread.start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_chunked_answer_and_a_made_up_length(http_server):
    url = _start(http_server)
    got = transport.fetch(f"{url}/chunked", {}, deadline_s=5, connect_timeout_s=2,
                          max_bytes=1 << 20)
    assert got.status == 200 and got.body == b"first,second," + b"x" * 70000
    assert got.header("transfer-encoding") == "chunked"
    with pytest.raises(transport.DeadlineExceeded) as info:  # 64000 bytes over 1.6 s
        transport.fetch(f"{url}/slow", {}, deadline_s=0.8, connect_timeout_s=2)
    assert info.value.phase == "receive"
    # a drip behind a made-up Content-Length of 1 GB buys no time
    with pytest.raises(transport.DeadlineExceeded):
        transport.fetch(f"{url}/lying", {}, deadline_s=0.8, connect_timeout_s=2,
                        max_bytes=10**9)
    with pytest.raises(transport.OversizedAnswer):
        transport.fetch(f"{url}/chunked", {}, deadline_s=5, connect_timeout_s=2,
                        max_bytes=1000)


def test_keep_alive_connections_are_reused(http_server, s3_env):
    client, session = _bounded(_start(http_server))  # answers every HEAD 200, keep-alive
    for _ in range(3):
        client.head_bucket(Bucket="kept")
    assert (session.requests, http_server.connections) == (3, 1)


def test_https_verifies_the_server_and_sends_sni(http_server, tmp_path: Path):
    ca = TestCA(tmp_path / "pki")
    context = ca.server_context(ca.issue("localhost", server=True))
    names: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    http_server.socket = context.wrap_socket(http_server.socket, server_side=True)
    port = _start(http_server).rsplit(":", 1)[1]
    trusted = ssl.create_default_context(cafile=str(ca.cert_file))
    got = transport.fetch(f"https://localhost:{port}/", {}, deadline_s=5,
                          connect_timeout_s=2, ssl_context=trusted)
    assert got.body == b"hello" and names == ["localhost"]
    with pytest.raises(transport.TLSError) as info:
        transport.fetch(f"https://localhost:{port}/", {}, deadline_s=5,
                        connect_timeout_s=2)  # system store only
    assert info.value.verify_message and info.value.phase == "tls"
