"""The typed seams of shipping: what the drainer and the finders need of their parts.

A test fake is checked against the same Protocol as the real part (mypy), so a fake that
drifts from the real thing fails lint, not production.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from device_agent.shipping.outbox import Item
    from device_agent.shipping.uploader import Head, PutResult



@dataclass
class FindResult:
    """What one look by a finder (reports folder, users file) queued, skipped, and met."""

    queued: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)

class Uploader(Protocol):
    """Conditional, proven puts into one bucket (uploader.Uploader)."""

    bucket: str

    def put_new(self, key: str, body: bytes, *, sha256: str, metadata: Mapping[str, str],
                content_type: str, ours: Collection[str] = ()) -> PutResult: ...

    def replace(self, key: str, body: bytes, *, sha256: str, metadata: Mapping[str, str],
                content_type: str, if_match: str, ours: Collection[str] = ()) -> PutResult: ...

    def head(self, key: str) -> Head | None: ...

    def list_prefix(self, prefix: str) -> dict[str, tuple[str, int]]: ...

    def max_duration_s(self, size: int) -> float: ...


class ItemQueue(Protocol):
    """The queue of items as the drainer works it (outbox.items.Items)."""

    def batch(self) -> AbstractContextManager[None]: ...

    def due(self, now: float | None = None, *, limit: int = 1000) -> list[Item]: ...

    def mark_delivered(self, item_id: int, *, etag: str | None, final_key: str,
                       outcome: str) -> None: ...

    def mark_failed(self, item_id: int, *, retryable: bool, error: str,
                    next_at: float | None = None) -> None: ...

    def note_attempt(self, item_id: int, error: str) -> None: ...

    def defer(self, item_id: int, next_at: float) -> None: ...

    def of_package(self, package: str) -> list[Item]: ...

    def update_content(self, item_id: int, *, sha256: str, size: int) -> None: ...


class QueuePause(Protocol):
    """The queue-wide pause the drainer holds and lifts (outbox.pause.Pause)."""

    def hold(self, until: float, reason: str) -> None: ...

    def lift(self) -> None: ...

    def current(self, now: float | None = None) -> tuple[float, str] | None: ...


class Queue(Protocol):
    """The outbox as the drainer uses it (outbox.Outbox): its items, its pause, and when
    it was created (files older than it may already be in the bucket)."""

    @property
    def items(self) -> ItemQueue: ...

    @property
    def pause(self) -> QueuePause: ...

    def created_at(self) -> float: ...
