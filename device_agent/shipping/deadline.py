"""How long one S3 or credentials request may take: decided here once, from the settings.

One `Deadlines` value is built at the edge and handed to the transport (which ends each
request by it), the uploader and the drainer's watchdog (which allow every attempt of a put
that long) and `status` (which shows it). The formula: the connect and read timeouts, plus
the body at S3_MIN_RATE_KBPS, where the body is what is sent (a put) or what the answer
says it carries (a download), never more than `max_body_bytes`: so no answer, however
large it claims to be or however fast it keeps coming, buys a deadline past `cap_s`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from device_agent.core.config import Settings

BACKOFF_CAP_S = 20.0  # botocore standard retry mode sleeps at most this between attempts
MIB = 1 << 20


@dataclass(frozen=True)
class Deadlines:
    """The total time a request may take, connect to last byte, and what follows from it."""

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    min_rate_bps: float = 16 * 1024.0
    max_body_bytes: int = 64 * MIB
    attempts: int = 3

    def __post_init__(self) -> None:
        if self.min_rate_bps <= 0 or self.max_body_bytes < 0 or self.attempts < 1:
            raise ValueError(f"invalid deadlines {self!r}")

    @property
    def base_s(self) -> float:
        """A request without a body: connect, then the whole answer."""
        return self.connect_timeout_s + self.read_timeout_s

    def request_s(self, body_bytes: int) -> float:
        """Seconds for one request that carries (or fetches) `body_bytes`, at most cap_s."""
        return self.base_s + min(max(body_bytes, 0), self.max_body_bytes) / self.min_rate_bps

    @property
    def cap_s(self) -> float:
        """No request is ever given longer than this."""
        return self.request_s(self.max_body_bytes)

    def put_total_s(self, body_bytes: int) -> float:
        """Every attempt of one put with botocore's backoff between them: the watchdog's limit."""
        return self.attempts * (self.request_s(body_bytes) + BACKOFF_CAP_S)

    def describe(self) -> dict[str, float | int]:
        """The numbers `status` shows."""
        return {"request_s": round(self.base_s, 1),
                "per_mib_s": round(MIB / self.min_rate_bps, 1),
                "cap_s": round(self.cap_s, 1), "attempts": self.attempts,
                "put_1mib_total_s": round(self.put_total_s(MIB), 1)}

    @classmethod
    def from_settings(cls, settings: Settings, *, connect_timeout_s: float | None = None,
                      read_timeout_s: float | None = None,
                      attempts: int | None = None) -> Deadlines:
        """The deadlines of S3_CONNECT/READ_TIMEOUT_S, S3_MIN_RATE_KBPS, S3_MAX_ATTEMPTS; the
        largest body is a dropped report at REPORT_MAX_MB (the agent's own files are smaller)."""
        return cls(connect_timeout_s=connect_timeout_s or settings.s3_connect_timeout_s,
                   read_timeout_s=read_timeout_s or settings.s3_read_timeout_s,
                   min_rate_bps=settings.s3_min_rate_kbps * 1024.0,
                   max_body_bytes=int(settings.report_max_mb * MIB) + MIB,
                   attempts=attempts or settings.s3_max_attempts)
