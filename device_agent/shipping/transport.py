"""Every request ends: urllib3 (botocore's own) does HTTP; this module adds a deadline and a bound.

botocore's connect_timeout/read_timeout bound each socket operation, not the request: a peer
that drips one byte every two seconds keeps a put alive for hours, and one that never stops
answering fills memory. Here the sockets urllib3 is given spend only the time left before
the request's deadline on each operation and count the answer's bytes against a bound, so
name resolution, connect, a proxy's CONNECT, TLS, the request, the status line, the headers
and the body all finish in time (or the request fails as a timeout) and no answer is read
past what it can legitimately hold.

`DeadlineSession` is botocore's URLLib3Session (pooling, proxies, 100-continue and early
answers stay botocore's and urllib3's) on those sockets; `install` puts one under a boto3
client, made from the client's own Config. `fetch` is one bounded GET (IoT credentials).
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from botocore import exceptions as bx
from botocore.awsrequest import (
    AWSHTTPConnection,
    AWSHTTPConnectionPool,
    AWSHTTPResponse,
    AWSHTTPSConnection,
    AWSHTTPSConnectionPool,
)
from botocore.httpsession import URLLib3Session
from urllib3 import Timeout
from urllib3 import exceptions as ux
from urllib3.util.connection import allowed_gai_family

from device_agent.shipping.deadline import Deadlines

if TYPE_CHECKING:
    from botocore.awsrequest import AWSPreparedRequest, AWSResponse

SMALL_ANSWER_MAX = 64 * 1024  # S3's answer to a PUT, HEAD or DELETE, or an error: a few KB
LIST_ANSWER_MAX = 4 << 20  # a page of ListObjectsV2 (1000 keys) is a few hundred KB
CREDENTIALS_ANSWER_MAX = 64 * 1024  # the IoT credentials document is about 2 KB
_MAX_INTERIM = 8  # interim (1xx) answers passed over before the final one


# --- one request in flight --------------------------------------------------------------------

class AnswerTooLargeError(OSError):
    """The answer ran past the bytes it may have (urllib3 reports it as a broken connection)."""


class Exchange:
    """One request: the monotonic time it must end by and the answer bytes it may read."""

    def __init__(self, url: str, deadline_s: float, limit: int) -> None:
        self.url = url
        self.started = time.monotonic()
        self.deadline_s = deadline_s
        self.limit = limit
        self.received = 0
        self.expired = False
        self.too_large = False

    def left(self) -> float:
        """Seconds left; TimeoutError (what urllib3 reports as a timeout) once none are."""
        left = self.started + self.deadline_s - time.monotonic()
        if left <= 0:
            self.expired = True
            raise TimeoutError(f"{self.url}: the {self.deadline_s:.1f} s deadline passed")
        return left

    def count(self, n: int) -> None:
        """Note `n` answer bytes; AnswerTooLargeError past the limit."""
        self.received += n
        if self.received > self.limit:
            self.too_large = True
            raise AnswerTooLargeError(f"{self.url}: the answer ran past {self.limit} bytes")

    def allow(self, deadline_s: float) -> None:
        """Let the request run `deadline_s` from its start, if that is longer."""
        self.deadline_s = max(self.deadline_s, deadline_s)


_current = threading.local()


def current() -> Exchange | None:
    """The request this thread is making; its sockets obey it. A download's stays current
    after send() returns, while its caller reads the body, until the thread's next request."""
    return getattr(_current, "exchange", None)


def _enter(exchange: Exchange | None) -> Exchange | None:
    previous = current()
    _current.exchange = exchange
    return previous


# --- sockets that obey it ---------------------------------------------------------------------

class _Budgeted:
    """Each operation gets min(its own timeout, time left); each byte received is counted."""

    _own_timeout: float | None = None

    def settimeout(self, value: float | None) -> None:
        self._own_timeout = value
        super().settimeout(value)  # type: ignore[misc]

    def _arm(self) -> Exchange | None:
        exchange = current()
        if exchange is not None:
            left = exchange.left()
            own = self._own_timeout
            super().settimeout(left if own is None else min(own, left))  # type: ignore[misc]
        return exchange

    def _call(self, name: str, *args: Any) -> Any:
        exchange = self._arm()
        try:
            return getattr(super(), name)(*args)
        except TimeoutError:
            if exchange is not None:
                exchange.left()  # marks it expired if the timeout was the deadline's
            raise

    def recv(self, *args: Any) -> bytes:
        data: bytes = self._call("recv", *args)
        if (exchange := current()) is not None:
            exchange.count(len(data))
        return data

    def recv_into(self, *args: Any) -> int:
        n: int = self._call("recv_into", *args)
        if (exchange := current()) is not None:
            exchange.count(n)
        return n

    def send(self, *args: Any) -> int:
        return int(self._call("send", *args))

    def sendall(self, *args: Any) -> None:
        self._call("sendall", *args)  # sendall's timeout bounds the whole call (Python >= 3.5)


class _DeadlineSocket(_Budgeted, socket.socket):
    """A TCP socket under the thread's current request."""


class _DeadlineSSLSocket(_Budgeted, ssl.SSLSocket):
    """A TLS socket under the thread's current request; the handshake too."""

    def do_handshake(self, *args: Any) -> None:
        self._call("do_handshake", *args)


def resolve(host: str, port: int, timeout: float | None, *,
            getaddrinfo: Any = socket.getaddrinfo) -> list[Any]:
    """getaddrinfo within `timeout`: it has no timeout of its own, so it runs on a daemon
    thread that may outlive a resolver that never answers (it ends when the resolver does)."""
    family = allowed_gai_family()
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return list(getaddrinfo(host, port, family, socket.SOCK_STREAM))
    if timeout is None:
        return list(getaddrinfo(host, port, family, socket.SOCK_STREAM))
    outcome: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            outcome.append(list(getaddrinfo(host, port, family, socket.SOCK_STREAM)))
        except BaseException as exc:  # handed to the caller
            outcome.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=run, name=f"resolve-{host}", daemon=True)
    thread._allowed_to_leak = True  # type: ignore[attr-defined]  # see tests/conftest.py
    thread.start()
    if not done.wait(timeout):
        raise TimeoutError(f"name resolution of {host} took longer than {timeout:.1f} s")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return list(outcome[0])


def _budget(timeout: object) -> float | None:
    """The connection's connect timeout, or less if the request's deadline is nearer."""
    own = float(timeout) if isinstance(timeout, int | float) else None
    exchange = current()
    if exchange is None:
        return own
    left = exchange.left()
    return left if own is None else min(own, left)


def _dial(conn: Any) -> socket.socket:
    """urllib3's HTTPConnection._new_conn, on a _DeadlineSocket and a bounded resolver."""
    host, port = conn.host, conn.port
    try:
        infos = resolve(host, port, _budget(conn.timeout))
    except socket.gaierror as exc:
        raise ux.NameResolutionError(host, conn, exc) from exc
    except TimeoutError as exc:
        raise ux.ConnectTimeoutError(conn, f"{exc} (connect timeout={conn.timeout})") from exc
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = _DeadlineSocket(family, kind, proto)
        try:
            for option in conn.socket_options or ():
                sock.setsockopt(*option)
            sock.settimeout(_budget(conn.timeout))
            if conn.source_address:
                sock.bind(conn.source_address)
            sock.connect(address)
            return sock
        except TimeoutError as exc:
            sock.close()
            raise ux.ConnectTimeoutError(
                conn, f"Connection to {host} timed out. (connect timeout={conn.timeout})"
            ) from exc
        except OSError as exc:
            sock.close()
            error = exc
    raise ux.NewConnectionError(conn, f"Failed to establish a new connection: {error}")


class _Response(AWSHTTPResponse):
    """botocore's answer object, passing over every interim (1xx) answer: http.client skips
    only "100 Continue", and a "103" carrying an ETag and a checksum is no proof of a put."""

    def __init__(self, sock: Any, *args: Any, status_tuple: Any = None, **kwargs: Any) -> None:
        super().__init__(sock, *args, status_tuple=status_tuple, **kwargs)

    def _read_status(self) -> tuple[str, int, str]:
        for _ in range(_MAX_INTERIM + 1):
            version, status, reason = super()._read_status()
            if not 100 <= status < 200:
                return version, status, reason
            http.client.parse_headers(self.fp)  # an interim answer's headers mean nothing
        raise http.client.HTTPException(f"more than {_MAX_INTERIM} interim answers")


class _DeadlineConnection:
    """Mixin for botocore's connections: the deadline's sockets, the interim-proof answer."""

    @property
    def response_class(self) -> Any:
        return self.__dict__.get("_response_class") or functools.partial(_Response)

    @response_class.setter
    def response_class(self, value: Any) -> None:
        # botocore sets partial(AWSHTTPResponse, status_tuple=...) for an early answer
        status = getattr(value, "keywords", {}).get("status_tuple")
        self.__dict__["_response_class"] = functools.partial(_Response, status_tuple=status)

    def _new_conn(self) -> socket.socket:
        return _dial(self)


class _HTTPConnection(_DeadlineConnection, AWSHTTPConnection):
    pass


class _HTTPSConnection(_DeadlineConnection, AWSHTTPSConnection):
    def connect(self) -> None:
        if self.ssl_context is not None:
            self.ssl_context.sslsocket_class = _DeadlineSSLSocket
        super().connect()


class _HTTPPool(AWSHTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(AWSHTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


# --- botocore ---------------------------------------------------------------------------------

class AnswerTooLarge(bx.HTTPClientError):
    """The endpoint's answer was larger than any answer S3 gives to that request."""

    fmt = ('The answer from "{endpoint_url}" ran past {limit} bytes: it is not S3\'s answer '
           '(a proxy or portal in the way?)')


def request_body_length(request: AWSPreparedRequest) -> int:
    """Body bytes of a botocore request, from Content-Length or the body itself."""
    value = request.headers.get("Content-Length")
    if value is not None:
        with contextlib.suppress(ValueError):
            return int(value)
    body = request.body
    if isinstance(body, bytes | bytearray):
        return len(body)
    seek, tell = getattr(body, "seek", None), getattr(body, "tell", None)
    if seek is not None and tell is not None:
        with contextlib.suppress(OSError, ValueError):
            here = tell()
            end = seek(0, 2)
            seek(here)
            return int(end - here)
    return 0


class DeadlineSession(URLLib3Session):
    """botocore's urllib3 session whose every request ends by `deadlines.request_s(body)`
    (a download: of the body its answer announces) and reads a bounded answer."""

    def __init__(self, *, deadlines: Deadlines, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.deadlines = deadlines
        self.requests = 0
        # the pool classes live in this dict, which botocore shares with every pool
        # manager it makes (proxies' too): one place to give them our connections
        self._pool_classes_by_scheme.update(http=_HTTPPool, https=_HTTPSPool)

    def answer_limit(self, request: AWSPreparedRequest) -> int:
        """The most answer bytes a request may read: a download's body is read by its
        caller, who knows what it should hold; other answers are small."""
        if request.stream_output:
            return self.deadlines.max_body_bytes + SMALL_ANSWER_MAX
        return LIST_ANSWER_MAX if request.method == "GET" else SMALL_ANSWER_MAX

    def send(self, request: AWSPreparedRequest) -> AWSResponse:
        """Send through urllib3 under one deadline; botocore's own errors on failure."""
        self.requests += 1
        exchange = Exchange(request.url, self.deadlines.request_s(request_body_length(request)),
                            self.answer_limit(request))
        previous = _enter(exchange)
        try:
            response = super().send(request)
            if request.stream_output:
                announced = _content_length(response.headers.get("content-length"))
                if announced > exchange.limit:
                    response.raw.close()
                    raise AnswerTooLarge(endpoint_url=request.url, limit=exchange.limit)
                # a download may take as long as the body its answer announces, capped
                exchange.allow(self.deadlines.request_s(announced))
                response.raw = _Body(response.raw, exchange)
                return response  # its body is read later, under this same exchange
        except bx.HTTPClientError as exc:
            _enter(previous)
            raise _explain(exc, exchange) from exc
        except BaseException:
            _enter(previous)
            raise
        _enter(previous)
        return response


class _Body:
    """A download's urllib3 body, whose failures under our deadline or bound say so."""

    def __init__(self, raw: Any, exchange: Exchange) -> None:
        self._raw = raw
        self._exchange = exchange

    def read(self, *args: Any, **kwargs: Any) -> bytes:
        try:
            return bytes(self._raw.read(*args, **kwargs))
        except (ux.ProtocolError, ux.ReadTimeoutError) as exc:
            if self._exchange.too_large:
                raise AnswerTooLarge(endpoint_url=self._exchange.url,
                                     limit=self._exchange.limit) from exc
            if self._exchange.expired:
                raise bx.ReadTimeoutError(endpoint_url=self._exchange.url, error=exc) from exc
            raise

    def stream(self, amt: int = 1 << 16, **_: Any) -> Any:
        while data := self.read(amt):
            yield data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


def _content_length(value: str | None) -> int:
    try:
        return max(int(value or 0), 0)
    except ValueError:
        return 0


def _explain(exc: bx.HTTPClientError, exchange: Exchange) -> bx.HTTPClientError:
    """The error to raise when urllib3 met our deadline or bound (it sees a broken link)."""
    if exchange.too_large:
        return AnswerTooLarge(endpoint_url=exchange.url, limit=exchange.limit)
    if isinstance(exc, bx.ConnectTimeoutError | bx.ReadTimeoutError):
        return exc
    if exchange.expired:
        return bx.ReadTimeoutError(endpoint_url=exchange.url)
    return exc


def install(client: Any, deadlines: Deadlines) -> DeadlineSession:
    """Send a boto3 client's requests through a DeadlineSession made from its own Config.

    botocore's EndpointCreator takes an http_session_cls, but no public path reaches it, so
    the session is built here with the arguments it would pass and set on the endpoint.
    Not a `before-send` handler: botocore calls every one of those, so a handler of ours
    would send even when an in-process stub (moto) answered; the session is called only
    when none did.
    """
    from botocore.utils import get_environ_proxies

    endpoint = client._endpoint
    config = client.meta.config
    old = endpoint.http_session
    session = DeadlineSession(
        deadlines=deadlines,
        timeout=(config.connect_timeout, config.read_timeout),
        proxies=config.proxies or get_environ_proxies(endpoint.host),
        verify=getattr(old, "_verify", True),
        max_pool_connections=config.max_pool_connections,
        socket_options=getattr(old, "_socket_options", None),
        client_cert=config.client_cert,
        proxies_config=config.proxies_config,
    )
    endpoint.http_session = session
    old.close()
    return session


# --- one bounded GET, for the IoT credentials -------------------------------------------------

class TransportError(ConnectionError):
    """A request failed on the network; `phase` says where (connect, tls, receive)."""

    def __init__(self, message: str, *, url: str, phase: str) -> None:
        super().__init__(message)
        self.url = url
        self.phase = phase


class DeadlineExceeded(TransportError, TimeoutError):
    """Connect, the request and its whole answer did not finish before the deadline."""


class OversizedAnswer(TransportError):
    """The answer ran past the bytes it may have: not the endpoint we meant to ask."""


class TLSError(TransportError):
    """TLS failed: the peer sent an alert (`peer_alert`) or its certificate is not trusted."""

    def __init__(self, message: str, *, url: str, phase: str, peer_alert: str | None = None,
                 verify_message: str | None = None) -> None:
        super().__init__(message, url=url, phase=phase)
        self.peer_alert = peer_alert
        self.verify_message = verify_message


@dataclass(frozen=True)
class Response:
    """A complete HTTP answer: status, headers (as received) and the whole body."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """The named header (case-insensitive; repeated ones joined by ', '), or None."""
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        inner = [a for a in getattr(seen, "args", ()) if isinstance(a, BaseException)]
        seen = inner[0] if inner else (seen.__cause__ or seen.__context__)
    return None


def _failure(exc: Exception, exchange: Exchange) -> TransportError:
    """The one place that names a failed fetch: its kind and its phase."""
    url = exchange.url
    if exchange.too_large:
        return OversizedAnswer(f"{url}: the answer ran past {exchange.limit} bytes", url=url,
                               phase="receive")
    cause = _ssl_cause(exc)
    if isinstance(cause, ssl.SSLCertVerificationError):
        return TLSError(f"{url} (tls): server certificate not trusted: {cause.verify_message}",
                        url=url, phase="tls", verify_message=str(cause.verify_message))
    if cause is not None and not isinstance(cause, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        reason = str(getattr(cause, "reason", None) or cause)
        alert = reason if "ALERT" in reason.upper() else None
        what = f"the peer sent TLS alert {alert}" if alert else f"TLS error {reason}"
        return TLSError(f"{url} (tls): {what}", url=url, phase="tls", peer_alert=alert)
    # before the timeouts: urllib3's NewConnectionError (a refusal) is a ConnectTimeoutError
    if isinstance(exc, ux.NewConnectionError) and not exchange.expired:
        return TransportError(f"{url} (connect): {exc}", url=url, phase="connect")
    if exchange.expired or isinstance(exc, ux.TimeoutError | TimeoutError):
        phase = "connect" if isinstance(exc, ux.ConnectTimeoutError) else "receive"
        return DeadlineExceeded(f"{url} ({phase}): no complete answer within "
                                f"{exchange.deadline_s:.1f} s", url=url, phase=phase)
    return TransportError(f"{url} (receive): {type(exc).__name__}: {exc}", url=url,
                          phase="receive")


def fetch(url: str, headers: Mapping[str, str], *, deadline_s: float, connect_timeout_s: float,
          ssl_context: ssl.SSLContext | None = None,
          max_bytes: int = CREDENTIALS_ANSWER_MAX) -> Response:
    """One GET on a fresh connection that ends by `deadline_s` and reads at most `max_bytes`."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    timeout = Timeout(connect=connect_timeout_s, read=deadline_s)
    pool: Any
    if parts.scheme == "https":
        pool = _HTTPSPool(parts.hostname, parts.port or 443, timeout=timeout, maxsize=1,
                          ssl_context=ssl_context or ssl.create_default_context())
    else:
        pool = _HTTPPool(parts.hostname, parts.port or 80, timeout=timeout, maxsize=1)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    exchange = Exchange(url, deadline_s, max_bytes)
    previous = _enter(exchange)
    try:
        answer = pool.urlopen("GET", target, headers=dict(headers), retries=False,
                              redirect=False, preload_content=False)
        body = answer.read()
        return Response(answer.status, answer.reason or "", tuple(answer.headers.items()),
                        body)
    except Exception as exc:
        raise _failure(exc, exchange) from exc
    finally:
        _enter(previous)
        pool.close()
