"""HTTP/1.1 requests bounded by a total deadline, and a botocore sender built on them.

botocore's connect_timeout/read_timeout bound each socket operation, not the request: a peer
that drips one byte every two seconds keeps a put alive for hours while the outbox waits.
Here every send and recv gets the time left before one deadline as its timeout, so connect,
the request, the status line, the headers and the whole body finish in time or fail.

`send` is the plain client (the IoT credentials fetch uses it); `install_deadline_sender`
puts the same client under a boto3 client in place of its urllib3 session.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from botocore.awsrequest import AWSPreparedRequest, AWSResponse

log = logging.getLogger(__name__)

DEFAULT_BASE_DEADLINE_S = 30.0
DEFAULT_MIN_RATE_BPS = 16 * 1024  # slowest link we still wait for: 50 MB in ~53 min
_CHUNK = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}

Headers = Mapping[str, str] | Iterable[tuple[str, str]]
Body = bytes | bytearray | memoryview | str | IO[bytes] | Iterable[bytes] | None


# --- errors: all OSError (ConnectionError or TimeoutError), so callers that know only the
# builtins still treat them as "the network failed, try again later" -------------------------

class TransportError(ConnectionError):
    """A request failed on the network; `phase` says where (connect, tls, send, receive)."""

    def __init__(self, message: str, *, url: str, phase: str) -> None:
        super().__init__(message)
        self.url = url
        self.phase = phase


class ConnectFailed(TransportError):
    """No connection: refused, unreachable host or network, or the name does not resolve."""


class ConnectTimeout(TransportError, TimeoutError):
    """The TCP connect or the TLS handshake did not finish within the connect timeout."""


class DeadlineExceeded(TransportError, TimeoutError):
    """The request and its whole answer did not finish before the deadline."""


class ConnectionClosed(TransportError):
    """The peer closed or reset the connection before the answer was complete."""


class ProtocolError(TransportError):
    """The peer's answer is not HTTP/1.1 (bad status line, header too long)."""


class TLSError(TransportError):
    """TLS failed: the peer sent an alert (`peer_alert`) or its certificate is not trusted."""

    def __init__(self, message: str, *, url: str, phase: str, peer_alert: str | None = None,
                 verify_message: str | None = None) -> None:
        super().__init__(message, url=url, phase=phase)
        self.peer_alert = peer_alert
        self.verify_message = verify_message


def _translate(exc: BaseException, *, url: str, phase: str) -> TransportError:
    """The one place that maps stdlib socket/ssl/http.client errors to TransportError."""
    if isinstance(exc, TransportError):
        return exc
    where = f"{url} ({phase})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TLSError(f"{where}: server certificate not trusted: {exc.verify_message}",
                        url=url, phase=phase, verify_message=str(exc.verify_message))
    if isinstance(exc, ssl.SSLZeroReturnError | ssl.SSLEOFError):
        return ConnectionClosed(f"{where}: TLS connection closed by the peer", url=url,
                                phase=phase)
    if isinstance(exc, ssl.SSLError):
        reason = str(getattr(exc, "reason", None) or exc)
        alert = reason if "ALERT" in reason.upper() else None
        what = f"the peer sent TLS alert {alert}" if alert else f"TLS error {reason}"
        return TLSError(f"{where}: {what}", url=url, phase=phase, peer_alert=alert)
    if isinstance(exc, TimeoutError):
        return DeadlineExceeded(f"{where}: deadline passed", url=url, phase=phase)
    if isinstance(exc, http.client.IncompleteRead):
        return ConnectionClosed(f"{where}: connection closed after {len(exc.partial)} of "
                                f"{(exc.expected or 0) + len(exc.partial)} body bytes",
                                url=url, phase=phase)
    if isinstance(exc, http.client.RemoteDisconnected | ConnectionError | EOFError):
        return ConnectionClosed(f"{where}: connection closed by the peer ({exc})", url=url,
                                phase=phase)
    if isinstance(exc, http.client.HTTPException):
        return ProtocolError(f"{where}: not an HTTP/1.1 answer ({type(exc).__name__}: "
                             f"{str(exc)[:80]})", url=url, phase=phase)
    if isinstance(exc, OSError):
        return ConnectionClosed(f"{where}: {exc}", url=url, phase=phase)
    return ProtocolError(f"{where}: {type(exc).__name__}: {exc}", url=url, phase=phase)


# --- a socket whose every operation is bounded by the time left ------------------------------

class _DeadlineSocket:
    """Wraps a socket so each send/recv times out at one absolute monotonic deadline.

    With `credit_rate` (bytes/s), each byte received moves the deadline 1/rate s later: an
    answer that keeps arriving at least that fast is never cut off, one that drips is, and
    a Content-Length the peer made up buys nothing.
    """

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self.deadline = deadline
        self.credit_rate: float | None = None
        # like socket.socket: close() waits for the files made from it (http.client closes
        # the connection while a will-close answer is still being read through one)
        self._io_refs = 0
        self._closed = False

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            self._sock.settimeout(self._left())
            sent = self._sock.send(view[:_CHUNK])
            view = view[sent:]

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self._sock.settimeout(self._left())
        n = self._sock.recv_into(buffer, nbytes, flags)
        if self.credit_rate:
            self.deadline += n / self.credit_rate
        return n

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._sock.settimeout(self._left())
        data = self._sock.recv(bufsize, flags)
        if self.credit_rate:
            self.deadline += len(data) / self.credit_rate
        return data

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        if mode != "rb":
            raise ValueError(f"mode {mode!r}: only 'rb' is supported")
        self._io_refs += 1
        return io.BufferedReader(socket.SocketIO(self, "rb"))  # type: ignore[arg-type]

    def _decref_socketios(self) -> None:
        """SocketIO calls this on close; the socket lives on unless close() was called."""
        self._io_refs = max(self._io_refs - 1, 0)
        if self._closed and self._io_refs == 0:
            self._really_close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def setsockopt(self, *args: Any) -> None:
        self._sock.setsockopt(*args)

    def readable_or_closed(self) -> bool:
        """True if an idle connection has data or EOF waiting: the peer gave up on it."""
        if isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
            return True
        try:
            ready, _, _ = select.select([self._sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(ready)

    def close(self) -> None:
        self._closed = True
        if self._io_refs == 0:
            self._really_close()

    def _really_close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def abort(self) -> None:
        """Close now, whatever still reads from it (after an error or a timeout)."""
        self._closed = True
        self._really_close()


class _Connection(http.client.HTTPConnection):
    """One HTTP(S) connection whose socket obeys the current request's deadline."""

    def __init__(self, scheme: str, host: str, port: int, *, connect_timeout_s: float,
                 ssl_context: ssl.SSLContext | None, url: str) -> None:
        super().__init__(host, port, timeout=connect_timeout_s)
        self.scheme = scheme
        self.connect_timeout_s = connect_timeout_s
        self.ssl_context = ssl_context
        self.deadline = time.monotonic()
        self.url = url
        self.blocksize = _CHUNK
        self.idle_since = time.monotonic()

    def connect(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"{self.url} (connect): deadline passed before connecting",
                                   url=self.url, phase="connect")
        timeout = min(self.connect_timeout_s, left)
        try:
            raw = socket.create_connection((self.host, self.port), timeout)
        except TimeoutError as exc:
            raise ConnectTimeout(f"{self.url} (connect): no connection within {timeout:.1f} s",
                                 url=self.url, phase="connect") from exc
        except OSError as exc:
            raise ConnectFailed(f"{self.url} (connect): {exc}", url=self.url,
                                phase="connect") from exc
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock: socket.socket = raw
            if self.scheme == "https":
                context = self.ssl_context or ssl.create_default_context()
                raw.settimeout(min(self.connect_timeout_s, max(self.deadline - time.monotonic(),
                                                               0.001)))
                try:
                    sock = context.wrap_socket(raw, server_hostname=self.host)
                except TimeoutError as exc:
                    raise ConnectTimeout(f"{self.url} (tls): no TLS handshake within "
                                         f"{timeout:.1f} s", url=self.url, phase="tls") from exc
                except OSError as exc:
                    raise _translate(exc, url=self.url, phase="tls") from exc
        except BaseException:
            raw.close()
            raise
        self.sock = _DeadlineSocket(sock, self.deadline)

    def abort(self) -> None:
        """Close the socket at once, even while an answer is being read from it."""
        if isinstance(self.sock, _DeadlineSocket):
            self.sock.abort()
        self.close()

    def start(self, deadline: float, credit_rate: float | None = None) -> None:
        """Arm the connection for one request that must finish by `deadline`."""
        self.deadline = deadline
        if isinstance(self.sock, _DeadlineSocket):
            self.sock.deadline = deadline
            self.sock.credit_rate = credit_rate


# --- a small keep-alive pool -----------------------------------------------------------------

PoolKey = tuple[str, str, int, int]


class ConnectionPool:
    """Idle keep-alive connections per (scheme, host, port, TLS context); thread-safe."""

    def __init__(self, *, max_idle_per_host: int = 4, max_idle_s: float = 30.0) -> None:
        self.max_idle_per_host = max_idle_per_host
        self.max_idle_s = max_idle_s
        self._idle: dict[PoolKey, list[_Connection]] = {}
        self._lock = threading.Lock()
        self.opened = 0
        self.reused = 0

    def take(self, key: PoolKey) -> _Connection | None:
        """A live idle connection for `key`, or None (stale ones are closed on the way)."""
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                conn = idle.pop()
            sock = conn.sock
            if (time.monotonic() - conn.idle_since > self.max_idle_s
                    or not isinstance(sock, _DeadlineSocket) or sock.readable_or_closed()):
                conn.close()
                continue
            with self._lock:
                self.reused += 1
            return conn

    def give_back(self, key: PoolKey, conn: _Connection) -> None:
        """Keep a connection whose last answer was read to the end without error."""
        conn.idle_since = time.monotonic()
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self.max_idle_per_host:
                idle.append(conn)
                return
        conn.close()

    def note_opened(self) -> None:
        with self._lock:
            self.opened += 1

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


# --- one exchange -----------------------------------------------------------------------------

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


class StreamingResponse:
    """An answer whose body is read on demand, still under the request's deadline."""

    def __init__(self, conn: _Connection, response: http.client.HTTPResponse, *, url: str,
                 pool: ConnectionPool | None, key: PoolKey) -> None:
        self._conn: _Connection | None = conn
        self._response = response
        self._pool = pool
        self._key = key
        self.url = url
        self.status = response.status
        self.reason = response.reason
        self.headers: tuple[tuple[str, str], ...] = tuple(response.getheaders())

    def header(self, name: str) -> str | None:
        """The named header (case-insensitive; repeated ones joined by ', '), or None."""
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None

    def read(self, amt: int | None = None) -> bytes:
        """Up to `amt` body bytes (all that is left if None); b'' at the end."""
        if self._conn is None:
            return b""
        try:
            data = self._response.read(amt)
        except Exception as exc:
            self._discard()
            raise _translate(exc, url=self.url, phase="receive") from exc
        except BaseException:
            self._discard()
            raise
        if self._response.isclosed():
            self._finish()
        return data

    def stream(self, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        """The body in chunks, as botocore's AWSResponse.content expects of its raw object."""
        while True:
            data = self.read(chunk_size)
            if not data:
                return
            yield data

    def _finish(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._pool is not None and not self._response.will_close:
            self._pool.give_back(self._key, conn)
        else:
            conn.close()

    def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()  # never reuse a connection after an error or a timeout

    def close(self) -> None:
        """Give up on the rest of the body; the connection is closed, not reused."""
        if self._conn is not None and not self._response.isclosed():
            self._discard()
        else:
            self._finish()

    @property
    def closed(self) -> bool:
        return self._conn is None


def _header_items(headers: Headers) -> list[tuple[str, str]]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    out = []
    for name, value in items:
        n = name.decode("latin-1") if isinstance(name, bytes) else str(name)
        v = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        out.append((n, v))
    return out


def _body_length(body: Body) -> int | None:
    """Bytes in a body when they can be known without reading it."""
    if body is None:
        return 0
    if isinstance(body, str):
        return len(body.encode("utf-8"))
    if isinstance(body, bytes | bytearray | memoryview):
        return memoryview(body).nbytes
    seek, tell = getattr(body, "seek", None), getattr(body, "tell", None)
    if seek is not None and tell is not None:
        try:
            here = tell()
            end = seek(0, io.SEEK_END)
            seek(here)
            return int(end - here)
        except (OSError, ValueError):
            return None
    return None


def host_header(scheme: str, host: str, port: int) -> str:
    """The Host header value botocore signs: the port only when it is not the default."""
    shown = f"[{host}]" if ":" in host else host
    return shown if _DEFAULT_PORTS.get(scheme) == port else f"{shown}:{port}"


def open_stream(method: str, url: str, headers: Headers, body: Body = None, *,
                deadline_s: float, connect_timeout_s: float,
                ssl_context: ssl.SSLContext | None = None, pool: ConnectionPool | None = None,
                response_min_rate_bps: float | None = None) -> StreamingResponse:
    """Send a request and read its status and headers; the body is read later, same deadline.

    With `response_min_rate_bps`, each byte of the answer moves the deadline 1/rate s later,
    so a large download that keeps up that rate is not cut off while a dripping one is.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    host = parts.hostname
    port = parts.port or _DEFAULT_PORTS[scheme]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    deadline = time.monotonic() + deadline_s
    context = ssl_context if scheme == "https" else None
    if scheme == "https" and context is None:
        context = ssl.create_default_context()
    key: PoolKey = (scheme, host, port, id(context))
    items = [(k, v) for k, v in _header_items(headers)
             # no interim 100 Continue round: the body follows the headers at once
             if not (k.lower() == "expect" and v.strip().lower() == "100-continue")]
    names = {k.lower() for k, _ in items}
    # the caller's "Transfer-Encoding: chunked" asks us to frame the body (botocore's
    # aws-chunked uploads over HTTPS say so and expect the HTTP framing around theirs)
    chunked = any(k.lower() == "transfer-encoding" and v.strip().lower() == "chunked"
                  for k, v in items)
    if body is not None and "content-length" not in names and "transfer-encoding" not in names:
        length = _body_length(body)
        if length is None:
            chunked = True
            items.append(("Transfer-Encoding", "chunked"))
        else:
            items.append(("Content-Length", str(length)))
    if isinstance(body, str):
        body = body.encode("utf-8")

    conn = pool.take(key) if pool is not None else None
    if conn is None:
        conn = _Connection(scheme, host, port, connect_timeout_s=connect_timeout_s,
                           ssl_context=context, url=url)
        conn.start(deadline)
        try:
            conn.connect()
        except Exception as exc:
            conn.abort()
            raise _translate(exc, url=url, phase="connect") from exc
        except BaseException:
            conn.abort()
            raise
        if pool is not None:
            pool.note_opened()
    conn.url = url
    conn.start(deadline)

    phase = "send"
    try:
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        if "host" not in names:
            conn.putheader("Host", host_header(scheme, host, port))
        for name, value in items:
            conn.putheader(name, value)
        try:
            conn.endheaders(message_body=body, encode_chunked=chunked)
        except (ConnectionError, ssl.SSLError):
            # The peer may have answered early and closed (an error status, a TLS alert):
            # that answer says more than "broken pipe" does.
            early = _early_answer(conn, method, url)
            if early is None:
                raise
            response = early
        else:
            phase = "receive"
            if isinstance(conn.sock, _DeadlineSocket):
                conn.sock.credit_rate = response_min_rate_bps
            response = conn.getresponse()
    except Exception as exc:
        conn.abort()
        raise _translate(exc, url=url, phase=phase) from exc
    except BaseException:
        conn.abort()
        raise
    return StreamingResponse(conn, response, url=url, pool=pool, key=key)


def _early_answer(conn: _Connection, method: str, url: str) -> http.client.HTTPResponse | None:
    """An answer the peer sent before it stopped reading our request, if one is there."""
    sock = conn.sock
    if not isinstance(sock, _DeadlineSocket):
        return None
    response = http.client.HTTPResponse(sock, method=method)  # type: ignore[arg-type]
    try:
        response.begin()
    except ssl.SSLError as exc:
        raise _translate(exc, url=url, phase="send") from exc
    except (OSError, http.client.HTTPException):
        return None
    response.will_close = True  # the request was not sent whole: never reuse this
    return response


def send(method: str, url: str, headers: Headers, body: Body = None, *, deadline_s: float,
         connect_timeout_s: float, ssl_context: ssl.SSLContext | None = None,
         pool: ConnectionPool | None = None,
         response_min_rate_bps: float | None = None) -> Response:
    """One HTTP/1.1 exchange that connects, sends and reads the whole answer by `deadline_s`."""
    stream = open_stream(method, url, headers, body, deadline_s=deadline_s,
                         connect_timeout_s=connect_timeout_s, ssl_context=ssl_context,
                         pool=pool, response_min_rate_bps=response_min_rate_bps)
    try:
        data = stream.read()
    finally:
        stream.close()
    return Response(stream.status, stream.reason, stream.headers, data)


def make_ssl_context(*, ca_file: str | None = None, cert_file: str | None = None,
                     key_file: str | None = None) -> ssl.SSLContext:
    """A verifying client TLS context: system store or `ca_file`, optional client cert/key."""
    context = ssl.create_default_context(cafile=ca_file)
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    return context


# --- botocore -------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeadlinePolicy:
    """Deadline for one request: base seconds plus its body size at a minimum rate."""

    base_s: float = DEFAULT_BASE_DEADLINE_S
    min_rate_bps: float = DEFAULT_MIN_RATE_BPS

    def __call__(self, request: AWSPreparedRequest) -> float:
        """Seconds allowed for `request` (connect, send and the whole answer)."""
        return self.base_s + request_body_length(request) / self.min_rate_bps


def request_body_length(request: AWSPreparedRequest) -> int:
    """Body bytes of a botocore request, from Content-Length or the body itself."""
    value = request.headers.get("Content-Length")
    if value is not None:
        with contextlib.suppress(ValueError):
            return int(value)
    return _body_length(request.body) or 0


class _RawBody:
    """The raw object AWSResponse reads: stream() and read(), botocore errors on failure."""

    def __init__(self, stream: StreamingResponse, request: AWSPreparedRequest) -> None:
        self._stream = stream
        self._request = request

    def read(self, amt: int | None = None) -> bytes:
        try:
            return self._stream.read(amt)
        except TransportError as exc:
            raise botocore_error(exc, self._request) from exc

    def stream(self, chunk_size: int = _CHUNK, **_: Any) -> Iterator[bytes]:
        while True:
            data = self.read(chunk_size)
            if not data:
                return
            yield data

    def close(self) -> None:
        self._stream.close()

    def release_conn(self) -> None:
        self._stream.close()


def botocore_error(exc: TransportError, request: AWSPreparedRequest) -> Exception:
    """The botocore HTTPClientError subclass its retry logic and classify_error expect."""
    from botocore import exceptions as bx

    url = request.url
    error: Exception
    if isinstance(exc, ConnectTimeout):
        error = bx.ConnectTimeoutError(endpoint_url=url, error=exc)
    elif isinstance(exc, DeadlineExceeded):
        error = bx.ReadTimeoutError(endpoint_url=url, error=exc)
    elif isinstance(exc, ConnectFailed):
        error = bx.EndpointConnectionError(endpoint_url=url, error=exc)
    elif isinstance(exc, TLSError):
        error = bx.SSLError(endpoint_url=url, error=exc)
    elif isinstance(exc, ConnectionClosed):
        error = bx.ConnectionClosedError(endpoint_url=url, request=request, error=exc)
    else:
        error = bx.HTTPClientError(error=exc)
    return error


class DeadlineSender:
    """Stands in for botocore's urllib3 session: each request ends by its deadline or fails."""

    def __init__(self, *, deadline_for: Callable[[AWSPreparedRequest], float],
                 connect_timeout_s: float, ssl_context: ssl.SSLContext | None = None,
                 response_min_rate_bps: float | None = DEFAULT_MIN_RATE_BPS,
                 pool: ConnectionPool | None = None) -> None:
        self.deadline_for = deadline_for
        self.connect_timeout_s = connect_timeout_s
        # one context for the sender's life: pooled connections are keyed by it
        self.ssl_context = ssl_context or ssl.create_default_context()
        self.response_min_rate_bps = response_min_rate_bps
        self.pool = pool if pool is not None else ConnectionPool()
        self.requests = 0
        self._count_lock = threading.Lock()

    def send(self, request: AWSPreparedRequest) -> AWSResponse:
        """Send a signed botocore request; raise botocore's own errors on failure."""
        from botocore.awsrequest import AWSResponse
        from botocore.compat import HTTPHeaders

        with self._count_lock:
            self.requests += 1
        try:
            stream = open_stream(request.method, request.url, request.headers.items(),
                                 request.body,
                                 deadline_s=self.deadline_for(request),
                                 connect_timeout_s=self.connect_timeout_s,
                                 ssl_context=self.ssl_context, pool=self.pool,
                                 response_min_rate_bps=self.response_min_rate_bps)
        except TransportError as exc:
            raise botocore_error(exc, request) from exc
        headers = HTTPHeaders()
        for name, value in stream.headers:
            if name in headers:  # repeated header: one value, joined as urllib3 does
                joined = f"{headers[name]}, {value}"
                del headers[name]
                headers[name] = joined
            else:
                headers[name] = value
        response = AWSResponse(request.url, stream.status, headers, _RawBody(stream, request))
        if not request.stream_output:
            _ = response.content  # read the whole body now, inside botocore's retry handling
        return response

    def close(self) -> None:
        """Close the pooled connections (botocore calls this from client.close())."""
        self.pool.close()


def install_deadline_sender(client: Any, *, connect_timeout_s: float,
                            deadline_for: Callable[[AWSPreparedRequest], float] | None = None,
                            ssl_context: ssl.SSLContext | None = None,
                            response_min_rate_bps: float | None = DEFAULT_MIN_RATE_BPS,
                            ) -> DeadlineSender | None:
    """Send a boto3 client's requests through the deadline client; None if a proxy applies.

    The sender replaces the endpoint's HTTP session rather than answering `before-send`:
    botocore emits before-send to every handler, so a handler of ours would also send (and
    fail) while moto's in-process mock answers; the session is used only when none did.
    """
    from botocore.utils import get_environ_proxies

    endpoint = client._endpoint  # botocore keeps the HTTP session on the endpoint
    proxies = dict(client.meta.config.proxies or {}) or get_environ_proxies(endpoint.host)
    if proxies:
        log.warning("a proxy is configured for %s: its requests keep botocore's per-read "
                    "timeouts, without a total deadline", endpoint.host)
        return None
    sender = DeadlineSender(deadline_for=deadline_for or DeadlinePolicy(),
                            connect_timeout_s=connect_timeout_s, ssl_context=ssl_context,
                            response_min_rate_bps=response_min_rate_bps)
    old = endpoint.http_session
    endpoint.http_session = sender
    with contextlib.suppress(Exception):
        old.close()
    return sender
