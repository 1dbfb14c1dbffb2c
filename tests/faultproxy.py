"""A fault-injecting TCP proxy on 127.0.0.1 in front of an HTTP server (moto), for tests.

Modes (switch with `set_mode`, which also drops every open connection so kept-alive ones
see the new mode): "pass" relays bytes; "refuse" stops listening (connection refused);
"slowdown" answers each request with 503 SlowDown; "reset" resets connections mid-request,
or after relaying a request but before its answer (the answer is lost, the write happened);
"drip" relays the request, then the answer one byte every `drip_interval_s`; "blackhole"
accepts and never answers (not even a TLS handshake); "portal" answers every request with a
captive portal's 200 OK HTML page; "http" relays request by request (HTTP/1.1 framing,
keep-alive) so a trap set with `arm` can act on one request: before it is forwarded, or after
S3 answered it and before the answer is relayed (the crash campaign kills the agent there).
"endless" answers 200 and then junk as fast as the client takes it, without end (chunked);
"huge" the same behind a Content-Length of 3 GB; "conflict" answers a put 200 with its ETag
and SHA-256 but two different Content-Length headers; "interim" sends an interim "103"
carrying an ETag and the body's SHA-256, then a captive portal's page as the final answer;
"pace" relays the answer at `pace_bps`; "tunnel" is an HTTP proxy (CONNECT) to upstream,
"tunnel-drip" one that hands the upstream's bytes back one per `drip_interval_s`.
With `server_context` the proxy terminates TLS.
`counts["client_gone"]` counts connections the client closed while the proxy held them;
`request_heads` holds the head (request line and headers) of every request relayed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import random
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

_SLOWDOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
             b"Connection: close\r\nContent-Length: %d\r\n\r\n%s")
_SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                  b"<Message>Please reduce your request rate.</Message></Error>")
PORTAL_HTML = (b"<!DOCTYPE html><html><head><title>Hospital Guest Wi-Fi</title></head>"
               b"<body><h1>Welcome</h1><p>Accept the terms of use to continue.</p>"
               b'<form method="post" action="/accept"><button>Accept</button></form>'
               b"</body></html>")
_PORTAL = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
           b"Connection: close\r\nContent-Length: %d\r\n\r\n%s")
MODES = ("pass", "refuse", "slowdown", "reset", "drip", "blackhole", "portal", "http",
         "endless", "huge", "conflict", "interim", "pace", "tunnel", "tunnel-drip")
HUGE_LENGTH = 3 * 10**9
BEFORE_FORWARD = "before_forward"  # the request reached the proxy; S3 never sees it
BEFORE_ANSWER = "before_answer"  # S3 answered 2xx (the write happened); the client never hears
TRAP_POINTS = (BEFORE_FORWARD, BEFORE_ANSWER)
_NO_BODY_STATUS = (204, 304)


@dataclass
class Trap:
    """Act once, on the `nth` request with `method` to reach `when` (mode "http")."""

    when: str
    nth: int
    action: Callable[[str], None]  # called with the request line, before anything else
    method: str = "PUT"
    seen: int = 0


@dataclass(frozen=True)
class Sprung:
    """A trap that acted: where, on which request line, and S3's status (BEFORE_ANSWER)."""

    when: str
    request_line: str
    status: int | None


@dataclass(frozen=True)
class _Message:
    start_line: bytes
    headers: dict[bytes, bytes]  # lower-cased names
    raw: bytes  # exactly the bytes read: head and framed body

    @property
    def method(self) -> str:
        return self.start_line.split(b" ", 1)[0].decode("ascii", "replace")

    @property
    def status(self) -> int:
        parts = self.start_line.split(b" ", 2)
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0

    @property
    def closes(self) -> bool:
        return self.headers.get(b"connection", b"").strip().lower() == b"close"


def _recv(sock: socket.socket) -> bytes:
    """Up to 64 KiB; for TLS also what OpenSSL already decrypted (select does not see it)."""
    data = sock.recv(65536)
    while data and isinstance(sock, ssl.SSLSocket) and sock.pending():
        data += sock.recv(sock.pending())
    return data


class _HeadRecorder:
    """Fed a connection's request bytes; appends each request head, skipping bodies."""

    def __init__(self, sink: list[bytes], lock: threading.Lock) -> None:
        self.sink = sink
        self.lock = lock
        self.buf = b""
        self.skip = 0
        self.lost = False  # a chunked body: further heads on this connection are unknown

    def feed(self, data: bytes) -> None:
        while data and not self.lost:
            if self.skip:
                taken = min(self.skip, len(data))
                self.skip -= taken
                data = data[taken:]
                continue
            self.buf += data
            data = b""
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data, self.buf = self.buf[:end], self.buf[end + 4:], b""
            with self.lock:
                self.sink.append(head)
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    self.skip = int(value.strip())
                elif name.strip().lower() == b"transfer-encoding":
                    self.lost = True


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a middlebox or a dying link would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    """Proxy 127.0.0.1:port -> upstream; `with FaultProxy(...) as p:` joins every thread."""

    def __init__(self, upstream_port: int, *, seed: int = 0,
                 server_context: ssl.SSLContext | None = None,
                 drip_interval_s: float = 0.5, pace_bps: int = 16 * 1024) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.mode = "pass"
        self.rng = random.Random(seed)
        self.server_context = server_context
        self.drip_interval_s = drip_interval_s
        self.pace_bps = pace_bps
        self.request_heads: list[bytes] = []
        self.counts = {"accepted": 0, "refused_periods": 0, "slowdowns": 0, "resets": 0,
                       "lost_answers": 0, "client_gone": 0, "drip_bytes": 0,
                       "drip_answer_bytes": 0, "portals": 0, "tls_failures": 0,
                       "http_requests": 0, "trapped": 0, "junk_bytes": 0, "tunnels": 0,
                       "paced_bytes": 0}
        self.trap: Trap | None = None
        self.sprung: list[Sprung] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self.port = self._listen(0)
        self._acceptor = threading.Thread(target=self._accept_loop, name="faultproxy-accept")
        self._acceptor.start()

    @property
    def url(self) -> str:
        scheme = "https" if self.server_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def _listen(self, port: int) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
        sock.settimeout(0.05)
        self._listener = sock
        return int(sock.getsockname()[1])

    def set_mode(self, mode: str) -> None:
        """Switch fault mode and drop open connections."""
        assert mode in MODES
        with self._lock:
            previous, self.mode = self.mode, mode
            if mode == "refuse" and self._listener is not None:
                self._listener.close()
                self._listener = None
                self.counts["refused_periods"] += 1
            elif previous == "refuse" and mode != "refuse":
                self._listen(self.port)
            conns, self._conns = self._conns, set()
        for conn in conns:
            _reset(conn)

    def arm(self, when: str, *, nth: int, action: Callable[[str], None],
            method: str = "PUT") -> None:
        """Set the one trap (mode "http"): `action` runs on the nth `method` request at `when`."""
        assert when in TRAP_POINTS and nth >= 1
        with self._lock:
            self.trap = Trap(when, nth, action, method)

    def disarm(self) -> None:
        """Remove the trap if it has not acted yet."""
        with self._lock:
            self.trap = None

    def _springs(self, when: str, method: str) -> Trap | None:
        """The trap, if this request is the one it waits for (it then is disarmed)."""
        with self._lock:
            trap = self.trap
            if trap is None or trap.when != when or trap.method != method:
                return None
            trap.seen += 1
            if trap.seen < trap.nth:
                return None
            self.trap = None
            self.counts["trapped"] += 1
            return trap

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            listener = self._listener
            if listener is None:
                self._stop.wait(0.05)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            self.counts["accepted"] += 1
            t = threading.Thread(target=self._serve, args=(client, self.mode),
                                 name="faultproxy-conn", daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, client: socket.socket, mode: str) -> None:
        client.settimeout(5)
        raw = client
        with self._lock:
            self._conns.add(client)
        try:
            if mode == "blackhole":
                self._hold(client)
                return
            if self.server_context is not None:
                try:
                    client = self.server_context.wrap_socket(client, server_side=True)
                except OSError:  # ssl.SSLError included
                    self.counts["tls_failures"] += 1
                    raise
                with self._lock:
                    self._conns.add(client)
            if mode == "drip":
                self._drip(client)
            elif mode == "portal":
                self._read_request(client)
                self.counts["portals"] += 1
                client.sendall(_PORTAL % (len(PORTAL_HTML), PORTAL_HTML))
                client.close()
            elif mode == "slowdown":
                self._read_head(client)
                self.counts["slowdowns"] += 1
                client.sendall(_SLOWDOWN % (len(_SLOWDOWN_BODY), _SLOWDOWN_BODY))
                client.close()
            elif mode == "reset":
                self._reset_mid_request(client)
            elif mode == "http":
                self._exchange(client)
            elif mode in ("endless", "huge"):
                self._endless(client, huge=mode == "huge")
            elif mode in ("conflict", "interim"):
                self._false_proof(client, interim=mode == "interim")
            elif mode == "pace":
                self._pace(client)
            elif mode in ("tunnel", "tunnel-drip"):
                self._tunnel(client, drip=mode == "tunnel-drip")
            else:
                self._relay(client)
        except OSError:
            _reset(client)
        finally:
            with self._lock:
                self._conns.discard(client)
                self._conns.discard(raw)

    def _read_head(self, client: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 65536:
            chunk = client.recv(4096)
            if not chunk:
                break
            data += chunk
        return data

    def _read_request(self, client: socket.socket) -> bytes:
        """Read a whole request (head and Content-Length body) so closing sends no RST."""
        data = self._read_head(client)
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(body) < length:
            chunk = client.recv(min(65536, length - len(body)))
            if not chunk:
                break
            body += chunk
        return body

    def _endless(self, client: socket.socket, *, huge: bool) -> None:
        """Answer 200, then junk as fast as the client reads it, until it hangs up."""
        self._read_request(client)
        framing = b"Content-Length: %d" % HUGE_LENGTH if huge else b"Transfer-Encoding: chunked"
        client.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%s\r\n\r\n"
                       % framing)
        junk = b"x" * 65536
        piece = junk if huge else b"%x\r\n%s\r\n" % (len(junk), junk)
        while not self._stop.is_set():
            try:
                client.sendall(piece)
            except OSError:
                self.counts["client_gone"] += 1
                return
            self.counts["junk_bytes"] += len(piece)

    def _false_proof(self, client: socket.socket, *, interim: bool) -> None:
        """Answer a request with what looks like S3's proof of a put, but is not a delivery."""
        body = self._read_request(client)
        sha = base64.b64encode(hashlib.sha256(body).digest())
        proof = b'ETag: "%s"\r\nx-amz-checksum-sha256: %s\r\n' % (
            hashlib.md5(body).hexdigest().encode(), sha)
        if interim:
            client.sendall(b"HTTP/1.1 103 Early Hints\r\n%s\r\n" % proof)
            client.sendall(_PORTAL % (len(PORTAL_HTML), PORTAL_HTML))
        else:
            client.sendall(b"HTTP/1.1 200 OK\r\n%sContent-Length: 0\r\nContent-Length: 5\r\n"
                           b"Connection: close\r\n\r\nhello" % proof)
        client.close()

    def _pace(self, client: socket.socket) -> None:
        """Relay one request; hand its answer back at `pace_bps`, in tenths of a second."""
        upstream = socket.create_connection(self.upstream, timeout=5)
        try:
            reader = _Reader(client, self._stop)
            request = reader.message(response_to=None)
            if request is None:
                return
            upstream.sendall(request.raw)
            answer = _Reader(upstream, self._stop).message(response_to=request.method)
            if answer is None:
                return
            data, step = answer.raw, max(1, self.pace_bps // 10)
            while data and not self._stop.wait(0.1):
                client.sendall(data[:step])
                self.counts["paced_bytes"] += min(step, len(data))
                data = data[step:]
        finally:
            upstream.close()
            with contextlib.suppress(OSError):
                client.close()

    def _tunnel(self, client: socket.socket, *, drip: bool) -> None:
        """An HTTP proxy's CONNECT to upstream (whatever host was asked for), then relay."""
        head = self._read_head(client)
        if not head.startswith(b"CONNECT "):
            client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return
        upstream = socket.create_connection(self.upstream, timeout=5)
        self.counts["tunnels"] += 1
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        pending = b""
        next_drip = time.monotonic()
        try:
            while not self._stop.is_set():
                try:
                    ready, _, _ = select.select([client, upstream], [], [], 0.05)
                except (ValueError, OSError):
                    return
                for sock in ready:
                    data = _recv(sock)
                    if not data:
                        if sock is client:
                            self.counts["client_gone"] += 1
                        return
                    if sock is client:
                        upstream.sendall(data)
                    else:
                        pending += data
                if pending and (not drip or time.monotonic() >= next_drip):
                    n = 1 if drip else len(pending)
                    client.sendall(pending[:n])
                    pending = pending[n:]
                    self.counts["drip_bytes"] += n if drip else 0
                    next_drip = time.monotonic() + self.drip_interval_s
        finally:
            upstream.close()
            with contextlib.suppress(OSError):
                client.close()

    def _hold(self, client: socket.socket) -> None:
        """Accept, read and discard, never answer; count the client giving up."""
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([client], [], [], 0.1)
            except (ValueError, OSError):  # set_mode/close dropped it under us (fd -1)
                return
            if not ready:
                continue
            try:
                data = client.recv(65536)
            except OSError:
                data = b""
            if not data:
                self.counts["client_gone"] += 1
                return

    def _drip(self, client: socket.socket) -> None:
        """Relay the request; hand the answer back one byte per interval."""
        upstream = socket.create_connection(self.upstream, timeout=5)
        pending = b""
        next_drip = time.monotonic() + self.drip_interval_s
        try:
            while not self._stop.is_set():
                wait = max(0.0, min(next_drip - time.monotonic(), 0.1))
                try:
                    ready, _, _ = select.select([client, upstream], [], [], wait)
                except (ValueError, OSError):  # set_mode/close dropped it under us (fd -1)
                    return
                for sock in ready:
                    try:
                        data = _recv(sock)
                    except OSError:
                        data = b""
                    if sock is client:
                        if not data:
                            self.counts["client_gone"] += 1
                            return
                        upstream.sendall(data)
                    elif data:
                        pending += data
                        self.counts["drip_answer_bytes"] += len(data)
                if pending and time.monotonic() >= next_drip:
                    try:
                        client.sendall(pending[:1])
                    except OSError:
                        self.counts["client_gone"] += 1
                        return
                    pending = pending[1:]
                    self.counts["drip_bytes"] += 1
                    next_drip = time.monotonic() + self.drip_interval_s
        finally:
            upstream.close()
            with contextlib.suppress(OSError):
                client.close()

    def _reset_mid_request(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream, timeout=5)
        try:
            if self.rng.random() < 0.5:
                # the headers and part of the body reach S3, then the link dies
                self._relay(client, upstream=upstream, cut_body_at=512)
            else:
                # the whole request reaches S3 (the write happens); its answer is lost
                self._relay(client, upstream=upstream, drop_answer=True)
                self.counts["lost_answers"] += 1
        finally:
            self.counts["resets"] += 1
            _reset(client)
            _reset(upstream)

    def _relay(self, client: socket.socket, *, upstream: socket.socket | None = None,
               drop_answer: bool = False, cut_body_at: int | None = None) -> None:
        upstream = upstream or socket.create_connection(self.upstream, timeout=5)
        recorder = _HeadRecorder(self.request_heads, self._lock)
        sent = b""
        try:
            while not self._stop.is_set():
                try:
                    ready, _, _ = select.select([client, upstream], [], [], 0.1)
                except (ValueError, OSError):
                    return  # a socket was closed under us (the proxy stopping or resetting)
                for sock in ready:
                    data = _recv(sock)
                    if not data:
                        return
                    if sock is client:
                        recorder.feed(data)
                        if cut_body_at is not None:
                            sent += data
                            head_end = sent.find(b"\r\n\r\n")
                            if head_end >= 0 and len(sent) > head_end + 4 + cut_body_at:
                                upstream.sendall(data[:len(data) - (len(sent) - head_end
                                                                    - 4 - cut_body_at)])
                                return  # mid-body: the rest never arrives
                        upstream.sendall(data)
                    elif (drop_answer or cut_body_at is not None) and \
                            data.startswith(b"HTTP/1.1 100"):
                        client.sendall(data)  # "100 Continue" lets the body follow
                    elif drop_answer:
                        return  # S3 answered: never let the client see it
                    else:
                        client.sendall(data)
        finally:
            upstream.close()
            with contextlib.suppress(OSError):
                client.close()

    def _exchange(self, client: socket.socket) -> None:
        """Relay request by request on a kept-alive connection; a trap may act on one."""
        upstream: socket.socket | None = None
        from_client = _Reader(client, self._stop)
        from_upstream: _Reader | None = None
        try:
            while True:
                request = from_client.message(response_to=None)
                if request is None:
                    return
                self.counts["http_requests"] += 1
                line = request.start_line.decode("ascii", "replace")
                trap = self._springs(BEFORE_FORWARD, request.method)
                if trap is not None:
                    self.sprung.append(Sprung(BEFORE_FORWARD, line, None))
                    trap.action(line)
                    return
                if upstream is None:
                    upstream = socket.create_connection(self.upstream, timeout=5)
                    from_upstream = _Reader(upstream, self._stop)
                assert from_upstream is not None
                upstream.sendall(request.raw)
                answer = from_upstream.message(response_to=request.method)
                while answer is not None and 100 <= answer.status < 200:
                    client.sendall(answer.raw)  # an interim answer (100 Continue)
                    answer = from_upstream.message(response_to=request.method)
                if answer is None:
                    return
                if 200 <= answer.status < 300:
                    trap = self._springs(BEFORE_ANSWER, request.method)
                    if trap is not None:
                        self.sprung.append(Sprung(BEFORE_ANSWER, line, answer.status))
                        trap.action(line)
                        return
                client.sendall(answer.raw)
                if request.closes or answer.closes:
                    return
        finally:
            if upstream is not None:
                upstream.close()
            with contextlib.suppress(OSError):
                client.close()

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(timeout=5)
        with self._lock:
            if self._listener is not None:
                self._listener.close()
            conns, self._conns = self._conns, set()
        for conn in conns:
            _reset(conn)
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Reader:
    """Buffered reads of whole HTTP/1.1 messages from one socket (until the proxy stops)."""

    def __init__(self, sock: socket.socket, stop: threading.Event) -> None:
        self.sock = sock
        self.stop = stop
        self.buf = b""

    def _fill(self) -> bool:
        """Read more into the buffer; False at EOF or when the proxy stops."""
        while not self.stop.is_set():
            pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()
            if not pending:
                ready, _, _ = select.select([self.sock], [], [], 0.1)
                if not ready:
                    continue
            data = _recv(self.sock)
            if not data:
                return False
            self.buf += data
            return True
        return False

    def _until(self, marker: bytes) -> bytes | None:
        while marker not in self.buf:
            if not self._fill():
                return None
        head, _, self.buf = self.buf.partition(marker)
        return head + marker

    def _exactly(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not self._fill():
                return None
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def _to_eof(self) -> bytes:
        while self._fill():
            pass
        data, self.buf = self.buf, b""
        return data

    def _chunked(self) -> bytes | None:
        framed = b""
        while True:
            size_line = self._until(b"\r\n")
            if size_line is None:
                return None
            framed += size_line
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    trailer = self._until(b"\r\n")
                    if trailer is None:
                        return None
                    framed += trailer
                    if trailer == b"\r\n":
                        return framed
            chunk = self._exactly(size + 2)
            if chunk is None:
                return None
            framed += chunk

    def message(self, *, response_to: str | None) -> _Message | None:
        """The next request (response_to None) or answer to a `response_to` request."""
        head = self._until(b"\r\n\r\n")
        if head is None:
            return None
        lines = head[:-4].split(b"\r\n")
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        message = _Message(lines[0], headers, b"")
        length = headers.get(b"content-length")
        if response_to is not None and (response_to == "HEAD" or 100 <= message.status < 200
                                        or message.status in _NO_BODY_STATUS):
            body: bytes | None = b""
        elif b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            body = self._chunked()
        elif length is not None:
            body = self._exactly(int(length))
        elif response_to is not None:
            body = self._to_eof()  # an answer without a length ends when the peer closes
        else:
            body = b""
        if body is None:
            return None
        return _Message(lines[0], headers, head + body)
