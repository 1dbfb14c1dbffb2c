"""The fault proxy's own threads end quietly when a connection is dropped under them.

`set_mode` and `close` reset open connections from another thread; a serving thread then
selects on a closed socket (fd -1). That must end the thread, not raise in it (the suite
turns an unhandled thread exception into an error: pyproject's filterwarnings).
"""

from __future__ import annotations

import socket
import threading

import pytest

from tests.conftest import wait_until
from tests.faultproxy import FaultProxy


@pytest.mark.parametrize("mode", ["drip", "blackhole"])
def test_a_connection_reset_under_a_serving_thread_ends_it_quietly(mode):
    thread_errors: list[BaseException | None] = []
    previous = threading.excepthook  # pytest's own, set for this test's call
    threading.excepthook = lambda args: thread_errors.append(args.exc_value)
    upstream = socket.socket()
    upstream.bind(("127.0.0.1", 0))
    upstream.listen(8)  # never accepts: the answer never comes, the proxy keeps waiting
    try:
        # interval 0: the drip thread selects without waiting, so the reset meets it between
        # two selects (the fd is -1 by the next one), as it did at the end of the suite
        with FaultProxy(upstream.getsockname()[1], drip_interval_s=0.0) as proxy:
            proxy.set_mode(mode)
            for _ in range(3):
                client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
                try:
                    client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    wait_until(lambda: proxy._conns, timeout=10,
                               what="the proxy to hold the connection")
                    serving = [t for t in proxy._threads if t.is_alive()]
                    proxy.set_mode(mode)  # drops every open connection under its thread
                    for t in serving:
                        t.join(timeout=10)
                        assert not t.is_alive()
                finally:
                    client.close()
    finally:
        upstream.close()
        threading.excepthook = previous
    assert thread_errors == []
