"""One place wires the parts from Settings: the service, `sync --once` and the demo use it.

`assembled(settings, stop=...)` opens the outbox and yields the Parts every path shares: the
settings, the clock, the outbox, the one uploader (None while CLOUD_UPLOAD_ENABLED is false)
and the stop event. From them `Parts.sync_loop()` builds the drainer and the sync loop, and
`Parts.service(notifier)` the serial reader, the capture and the Service. A path that needs a
different part (the demo's simulated board and local endpoint) says so through its Settings,
never by building its own copy: a setting is honoured everywhere or nowhere.

Only what a sync pass needs is imported up front; the serial reader and the service (and
through them the capture path) are imported when asked for, so `sync --once` stays light.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from device_agent.core.clock import Clock, clock_from_settings
from device_agent.core.config import Settings
from device_agent.shipping.drain import Drainer
from device_agent.shipping.outbox import Outbox
from device_agent.shipping.uploader import Uploader
from device_agent.sync import SyncLoop

if TYPE_CHECKING:
    from device_agent.link.port import SerialReader
    from device_agent.ops.notify import Notifier
    from device_agent.service import Service


def uploader_for(settings: Settings) -> Uploader | None:
    """The uploader with the one S3 client, or None while CLOUD_UPLOAD_ENABLED is false."""
    return Uploader.from_settings(settings) if settings.cloud_upload_enabled else None


@dataclass
class Parts:
    """The parts every path shares, and the builders of the rest, from one Settings."""

    settings: Settings
    clock: Clock
    outbox: Outbox
    uploader: Uploader | None
    stop: threading.Event

    def drainer(self) -> Drainer:
        """The drainer, with the retry cap and report size limit the settings give."""
        s = self.settings
        return Drainer(self.outbox, self.uploader, clock=self.clock, stop=self.stop,
                       backoff_cap_s=s.retry_max_backoff_s, report_max_bytes=s.report_max_bytes)

    def sync_loop(self) -> SyncLoop:
        """A sync loop on its own drainer (close() it to end the drainer's executor)."""
        return SyncLoop(self.settings, outbox=self.outbox, drainer=self.drainer(),
                        stop=self.stop, clock=self.clock)

    def reader(self) -> SerialReader:
        """The board link on settings.serial_port (not started)."""
        from device_agent.link.port import SerialReader

        return SerialReader.from_settings(self.settings)

    def service(self, notifier: Notifier) -> Service:
        """The running service: one reader shared by the captures, one sync loop."""
        from device_agent.service import PackageCapture, Service

        reader = self.reader()
        capture = PackageCapture(self.settings, reader, self.outbox, self.clock)
        return Service(self.settings, reader=reader, sync_loop=self.sync_loop(),
                       outbox=self.outbox, capture=capture, kept=capture.kept,
                       notifier=notifier, stop=self.stop, clock=self.clock,
                       credentials=None if self.uploader is None
                       else self.uploader.credentials.describe)


@contextmanager
def assembled(settings: Settings, *, stop: threading.Event) -> Iterator[Parts]:
    """Open the outbox and build the shared parts; the outbox is closed on exit."""
    clock = clock_from_settings(settings)
    with Outbox.open(settings) as outbox:
        yield Parts(settings, clock, outbox, uploader_for(settings), stop)
