"""The deadline-bounded HTTP client, alone and under boto3, against real servers on 127.0.0.1.

S3 parity runs against moto's HTTP server; the faults (a dripping answer, a captive portal, a
server that never answers, a refused port) come from tests/faultproxy.py in front of it; the
HTTP details (chunked bodies, keep-alive, SNI) from a small http.server on a thread.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import boto3
import pytest
from botocore import exceptions as bx
from botocore.config import Config

from device_agent import transport
from device_agent.uploader import Uploader, classify_error
from tests.conftest import wait_until
from tests.faultproxy import PORTAL_HTML, FaultProxy
from tests.pki import TestCA

pytestmark = pytest.mark.functional


def _s3(endpoint: str, *, attempts: int = 1, read_timeout: float = 5.0):
    """A boto3 S3 client of its own session (so moto's import order does not matter)."""
    config = Config(retries={"mode": "standard", "total_max_attempts": attempts},
                    connect_timeout=2, read_timeout=read_timeout)
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                          config=config)


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


def test_s3_calls_through_the_sender_match_botocores_own(s3_endpoint, s3_bucket):
    plain = _s3(s3_endpoint)
    bounded = _s3(s3_endpoint)
    sender = transport.install_deadline_sender(bounded, connect_timeout_s=2)
    assert sender is not None

    expected = _exercise(plain, s3_bucket, "plain")
    assert _exercise(bounded, s3_bucket, "bounded") == expected
    assert expected["missing"] == 404 and expected["after_delete"] == ["large.pdf"]
    assert sender.requests == 10  # every call above went through the deadline client


def test_uploader_conditional_puts_work_through_the_sender(s3_endpoint, s3_bucket):
    client = _s3(s3_endpoint)
    sender = transport.install_deadline_sender(client, connect_timeout_s=2)
    assert sender is not None
    uploader = Uploader(client, bucket=s3_bucket)
    body = b"%PDF-1.4 synthetic report"
    sha = hashlib.sha256(body).hexdigest()
    first = uploader.put_new("ecg-reports/a.pdf", body, sha256=sha, metadata={},
                             content_type="application/pdf")
    again = uploader.put_new("ecg-reports/a.pdf", body, sha256=sha, metadata={},
                             content_type="application/pdf")
    assert (first.outcome, again.outcome) == ("created", "already_delivered")  # 412 path
    assert uploader.head("ecg-reports/a.pdf").sha256 == sha


def test_moto_in_process_mock_keeps_answering(monkeypatch):
    from moto import mock_aws

    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "HTTPS_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(key, raising=False)
    with mock_aws():
        client = boto3.session.Session().client("s3", region_name="us-east-1")
        sender = transport.install_deadline_sender(client, connect_timeout_s=1)
        assert sender is not None
        client.create_bucket(Bucket="mocked")
        client.put_object(Bucket="mocked", Key="k", Body=b"v")
        assert client.get_object(Bucket="mocked", Key="k")["Body"].read() == b"v"
    assert sender.requests == 0  # moto answered before botocore reached its HTTP session


def test_s3_over_https_with_a_ca_file(tmp_path, s3_endpoint, s3_bucket):
    ca = TestCA(tmp_path / "pki")
    server = ca.issue("s3.local", server=True)
    with FaultProxy(_port(s3_endpoint), server_context=ca.server_context(server)) as front:
        trusted = _s3(front.url)
        transport.install_deadline_sender(
            trusted, connect_timeout_s=2,
            ssl_context=transport.make_ssl_context(ca_file=str(ca.cert_file)))
        trusted.put_object(Bucket=s3_bucket, Key="tls/a", Body=b"over tls")
        assert trusted.get_object(Bucket=s3_bucket, Key="tls/a")["Body"].read() == b"over tls"

        untrusted = _s3(front.url)  # system store: the test CA is unknown
        transport.install_deadline_sender(untrusted, connect_timeout_s=2)
        with pytest.raises(bx.SSLError) as info:
            untrusted.put_object(Bucket=s3_bucket, Key="tls/b", Body=b"x")
        # botocore's own SSLError, as urllib3 gives today (classify_error calls it permanent)
        assert "server certificate not trusted" in str(info.value)


def test_deadline_policy_allows_the_body_at_the_minimum_rate():
    from botocore.awsrequest import AWSRequest

    policy = transport.DeadlinePolicy(base_s=30, min_rate_bps=16 * 1024)
    big = AWSRequest("PUT", "http://127.0.0.1:9/b/k", data=b"x" * (16 * 1024 * 10)).prepare()
    small = AWSRequest("GET", "http://127.0.0.1:9/b/k").prepare()
    assert (policy(big), policy(small)) == (40.0, 30.0)


# --- faults -----------------------------------------------------------------------------------

def test_dripping_answer_is_cut_at_the_deadline(s3_endpoint, s3_bucket):
    with FaultProxy(_port(s3_endpoint), drip_interval_s=0.5) as proxy:
        proxy.set_mode("drip")
        client = _s3(proxy.url, read_timeout=10)
        transport.install_deadline_sender(client, connect_timeout_s=2,
                                          deadline_for=lambda request: 2.0)
        with pytest.raises(bx.ReadTimeoutError) as info:
            client.put_object(Bucket=s3_bucket, Key="drip/a.json", Body=b"{}")
        wait_until(lambda: proxy.counts["client_gone"] >= 1, what="the client to hang up")
        # the whole answer reached the proxy; the client gave up part way through it
        assert 0 < proxy.counts["drip_bytes"] < proxy.counts["drip_answer_bytes"]
    error = classify_error(info.value, bucket=s3_bucket, key="drip/a.json")
    assert (error.retryable, error.code) == (True, "Timeout")
    # the write happened: a later attempt meets it as "already delivered" (412 + SHA-256)
    assert _s3(s3_endpoint).head_object(Bucket=s3_bucket, Key="drip/a.json")["ContentLength"]


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
        client = _s3(proxy.url, attempts=2)
        sender = transport.install_deadline_sender(client, connect_timeout_s=2,
                                                   deadline_for=lambda request: 1.0)
        assert sender is not None
        with pytest.raises(bx.ReadTimeoutError):
            client.put_object(Bucket=s3_bucket, Key="drip/c.json", Body=b"{}")
        wait_until(lambda: proxy.counts["client_gone"] >= 2, what="both attempts to hang up")
        assert proxy.counts["accepted"] == 2 and sender.pool.reused == 0
        proxy.set_mode("pass")
        client.put_object(Bucket=s3_bucket, Key="drip/d.json", Body=b"{}")
        assert proxy.counts["accepted"] == 3


def test_captive_portal_page_reaches_botocore_intact(s3_endpoint, s3_bucket):
    with FaultProxy(_port(s3_endpoint)) as proxy:
        proxy.set_mode("portal")
        client = _s3(proxy.url)
        transport.install_deadline_sender(client, connect_timeout_s=2)
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
        client = _s3(proxy.url)
        transport.install_deadline_sender(client, connect_timeout_s=1,
                                          deadline_for=lambda request: 1.5)
        with pytest.raises(bx.ReadTimeoutError):
            client.put_object(Bucket=s3_bucket, Key="hole/a.json", Body=b"{}")
        wait_until(lambda: proxy.counts["client_gone"] >= 1, what="the client to hang up")

    ca = TestCA(tmp_path / "pki")
    context = ca.server_context(ca.issue("s3.local", server=True))
    with FaultProxy(_port(s3_endpoint), server_context=context) as proxy:
        proxy.set_mode("blackhole")  # accepts TCP, never starts TLS
        client = _s3(proxy.url)
        transport.install_deadline_sender(
            client, connect_timeout_s=1,
            ssl_context=transport.make_ssl_context(ca_file=str(ca.cert_file)))
        with pytest.raises(bx.ConnectTimeoutError) as info:
            client.put_object(Bucket=s3_bucket, Key="hole/b.json", Body=b"{}")
        wait_until(lambda: proxy.counts["client_gone"] >= 1, what="the client to hang up")
    assert classify_error(info.value, bucket=s3_bucket, key="hole/b.json").code == "Timeout"


def test_refused_port(s3_endpoint, s3_bucket):
    with FaultProxy(_port(s3_endpoint)) as proxy:
        proxy.set_mode("refuse")
        client = _s3(proxy.url)
        transport.install_deadline_sender(client, connect_timeout_s=1)
        with pytest.raises(bx.EndpointConnectionError) as info:
            client.put_object(Bucket=s3_bucket, Key="refused/a.json", Body=b"{}")
    error = classify_error(info.value, bucket=s3_bucket, key="refused/a.json")
    assert (error.retryable, error.code) == (True, "ConnectionError")


def test_install_declines_when_a_proxy_applies(s3_env, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = _s3("http://s3.example.invalid:9000")  # never contacted
    before = client._endpoint.http_session
    assert transport.install_deadline_sender(client, connect_timeout_s=1) is None
    assert client._endpoint.http_session is before


# --- HTTP details on a small local server -----------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1  # type: ignore[attr-defined]

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

    def do_PUT(self) -> None:
        body = self._body()
        self.server.requests.append((dict(self.headers), body))  # type: ignore[attr-defined]
        self._answer(hashlib.sha256(body).hexdigest().encode())

    def do_GET(self) -> None:
        stop: threading.Event = self.server.stop  # type: ignore[attr-defined]
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
def http_server(request) -> Iterator[ThreadingHTTPServer]:
    """A keep-alive HTTP/1.1 server on 127.0.0.1; `server.tls` may wrap it before use."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.connections = 0  # type: ignore[attr-defined]
    server.requests = []  # type: ignore[attr-defined]
    server.stop = threading.Event()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="test-http-server")
    server.thread = thread  # type: ignore[attr-defined]
    yield server
    server.stop.set()  # type: ignore[attr-defined]
    if thread.is_alive():
        server.shutdown()
    server.server_close()


def _start(server: ThreadingHTTPServer) -> str:
    server.thread.start()  # type: ignore[attr-defined]
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_chunked_answer_and_streamed_request_bodies(http_server):
    url = _start(http_server)
    got = transport.send("GET", f"{url}/chunked", {}, deadline_s=5, connect_timeout_s=2)
    assert got.status == 200 and got.body == b"first,second," + b"x" * 70000
    assert got.header("transfer-encoding") == "chunked"

    class Unseekable(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            return self._data.read(size)

    payload = bytes(range(256)) * 600
    for body in (iter([payload[:1000], payload[1000:]]), Unseekable(payload),
                 io.BytesIO(payload), payload):
        answer = transport.send("PUT", f"{url}/echo", {"Expect": "100-continue"}, body,
                                deadline_s=5, connect_timeout_s=2)
        assert answer.body == hashlib.sha256(payload).hexdigest().encode()
    framing = [(h.get("Transfer-Encoding"), h.get("Content-Length"), h.get("Expect"))
               for h, _ in http_server.requests]
    assert framing == [("chunked", None, None), ("chunked", None, None),
                       (None, str(len(payload)), None), (None, str(len(payload)), None)]


def test_keep_alive_reuse_and_no_reuse_after_close_or_timeout(http_server):
    url = _start(http_server)
    pool = transport.ConnectionPool()
    try:
        for _ in range(3):
            r = transport.send("GET", f"{url}/", {}, deadline_s=5, connect_timeout_s=2,
                               pool=pool)
            assert r.body == b"hello"
        assert (pool.opened, pool.reused, http_server.connections) == (1, 2, 1)
        transport.send("GET", f"{url}/close", {}, deadline_s=5, connect_timeout_s=2, pool=pool)
        transport.send("GET", f"{url}/", {}, deadline_s=5, connect_timeout_s=2, pool=pool)
        assert (pool.opened, http_server.connections) == (2, 2)
        with pytest.raises(transport.DeadlineExceeded):
            transport.send("GET", f"{url}/slow", {}, deadline_s=0.5, connect_timeout_s=2,
                           pool=pool)
        transport.send("GET", f"{url}/", {}, deadline_s=5, connect_timeout_s=2, pool=pool)
        assert pool.opened == 3  # the timed-out connection was not given back
    finally:
        pool.close()


def test_answer_bytes_arriving_at_the_minimum_rate_extend_the_deadline(http_server):
    url = _start(http_server)
    with pytest.raises(transport.DeadlineExceeded) as info:
        transport.send("GET", f"{url}/slow", {}, deadline_s=0.8, connect_timeout_s=2)
    assert info.value.phase == "receive"
    # each 8000-byte piece earns 0.5 s at 16000 B/s: the same paced answer now completes
    got = transport.send("GET", f"{url}/slow", {}, deadline_s=0.8, connect_timeout_s=2,
                         response_min_rate_bps=16000)
    assert got.body == b"s" * 64000
    # a drip behind a made-up Content-Length earns nothing
    with pytest.raises(transport.DeadlineExceeded):
        transport.send("GET", f"{url}/lying", {}, deadline_s=0.8, connect_timeout_s=2,
                       response_min_rate_bps=16000)


def test_https_verifies_the_server_and_sends_sni(http_server, tmp_path: Path):
    ca = TestCA(tmp_path / "pki")
    context = ca.server_context(ca.issue("localhost", server=True))
    names: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    http_server.socket = context.wrap_socket(http_server.socket, server_side=True)
    port = _start(http_server).rsplit(":", 1)[1]
    trusted = transport.make_ssl_context(ca_file=str(ca.cert_file))
    got = transport.send("GET", f"https://localhost:{port}/", {}, deadline_s=5,
                         connect_timeout_s=2, ssl_context=trusted)
    assert got.body == b"hello" and names == ["localhost"]
    with pytest.raises(transport.TLSError) as info:
        transport.send("GET", f"https://localhost:{port}/", {}, deadline_s=5,
                       connect_timeout_s=2)  # system store only
    assert info.value.verify_message and info.value.phase == "tls"
