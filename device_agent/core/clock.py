"""Is the wall clock right? And how to stamp a record captured before it was.

A board without a real-time clock boots in 1970 (or, with fake-hwclock, at the last shutdown
time) until NTP syncs. A record must never be named from such a clock: capture holds it with
its monotonic time and the boot id, and it is stamped once the clock is known, as
`wall = now - (monotonic_now - monotonic_at_capture)`, which is only valid within one boot.
That name (time and record id) is written to the held folder, fsync'd, before any file is
written under it: a release that crashes and runs again, the clock a millisecond on or in
the next boot, reuses it and never packages the record under a second stamp.

Sync evidence, Linux: the kernel's adjtimex() status (STA_UNSYNC clear, as set by ntpd,
chronyd and systemd-timesyncd) or systemd-timesyncd's /run/systemd/timesync/synchronized.
Either way the year must be at least YEAR_FLOOR. `check="floor"` trusts any clock past the
floor (a unit with a battery-backed RTC and no NTP); `check="ntp"` needs the evidence.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path

from device_agent.core.config import Settings
from device_agent.core.fsutil import atomic_write, fsync_dir, make_dirs

log = logging.getLogger(__name__)

YEAR_FLOOR = 2024
TIMESYNCD_FLAG = Path("/run/systemd/timesync/synchronized")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_TIME_ERROR = 5  # adjtimex() return value: clock not synchronised
_STA_UNSYNC = 0x0040
TICKET_NAME = "held.json"
NAME_FILE = "named.json"  # the name chosen for a held record, durable before any file uses it


class _Timeval(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long))


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h>; the trailing padding is part of the kernel ABI
    _fields_ = (
        ("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
        ("constant", ctypes.c_long), ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long), ("time", _Timeval), ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
        ("_pad", ctypes.c_int * 11),
    )


def local_now() -> datetime:
    """Timezone-aware local wall-clock time: the one "now" (records, metadata, logs)."""
    return datetime.now().astimezone()


def kernel_synced() -> bool | None:
    """The kernel's NTP discipline state via adjtimex(2) (read-only); None if unavailable.

    Works whatever the NTP client (chrony, ntpd, systemd-timesyncd). A seccomp filter that
    denies adjtimex (systemd's @system-service does; the unit allows it again) gives None.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        tx = _Timex()
        state = libc.adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return None
    if state < 0:
        log.debug("adjtimex failed: %s", os.strerror(ctypes.get_errno()))
        return None
    return state != _TIME_ERROR and not tx.status & _STA_UNSYNC


def timesyncd_synced(flag: Path = TIMESYNCD_FLAG) -> bool:
    """systemd-timesyncd touches this file once it has synchronised."""
    return flag.exists()


def boot_id(path: Path = BOOT_ID) -> str:
    """This boot's id (monotonic times compare only within one boot)."""
    try:
        return path.read_text().strip()
    except OSError:
        return "unknown"


@dataclass(frozen=True)
class ClockState:
    """What `status` shows: synced, the evidence, and the current time."""

    synced: bool
    reason: str
    now: str


class Clock:
    """The time collaborator: aware local now(), monotonic(), and whether to trust now()."""

    def __init__(self, *, check: str = "ntp", wall: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic,
                 kernel: Callable[[], bool | None] = kernel_synced,
                 timesyncd: Callable[[], bool] = timesyncd_synced) -> None:
        if check not in ("ntp", "floor"):
            raise ValueError(f"clock check {check!r} is not ntp or floor")
        self.check = check
        self._wall, self._mono = wall, mono
        self._kernel, self._timesyncd = kernel, timesyncd

    def now(self) -> datetime:
        """The wall clock as an aware datetime in local time."""
        return datetime.fromtimestamp(self._wall()).astimezone()

    def time(self) -> float:
        """Wall-clock epoch seconds (for scheduling that must survive restarts)."""
        return self._wall()

    def monotonic(self) -> float:
        return self._mono()

    def state(self) -> ClockState:
        """Whether the wall clock may name records, and why."""
        now = self.now()
        if now.year < YEAR_FLOOR:
            return ClockState(False, f"clock reads {now.year}, before {YEAR_FLOOR}: "
                              "waiting for NTP", now.isoformat())
        if self.check == "floor":
            return ClockState(True, f"after {YEAR_FLOOR} (CLOCK_CHECK=floor)", now.isoformat())
        if self._timesyncd():
            return ClockState(True, "systemd-timesyncd synchronised", now.isoformat())
        kernel = self._kernel()
        if kernel:
            return ClockState(True, "kernel reports NTP sync", now.isoformat())
        why = "kernel reports no NTP sync" if kernel is False else "no sync evidence"
        return ClockState(False, f"{why}: check the NTP service and network "
                          "(or CLOCK_CHECK=floor if the unit has a real-time clock)",
                          now.isoformat())

    def synced(self) -> bool:
        return self.state().synced


def clock_from_settings(settings: Settings) -> Clock:
    """The production clock for these settings."""
    return Clock(check=settings.clock_check)


# --- holding records captured before the clock was known ---------------------------------

@dataclass(frozen=True)
class HoldTicket:
    """When a held capture happened, in terms that survive until the clock is known."""

    monotonic_at_capture: float
    boot_id: str
    wall_at_capture: float  # untrusted; for the log only

    @classmethod
    def now(cls, clock: Clock) -> HoldTicket:
        """Take the ticket at the start of a capture (as the record's one timestamp)."""
        return cls(clock.monotonic(), boot_id(), clock.time())


def stamp_for(ticket: HoldTicket, clock: Clock, *, current_boot: str | None = None
              ) -> datetime | None:
    """The capture's true wall time once the clock is synced, same boot only; else None."""
    if not clock.synced():
        return None
    if ticket.boot_id != (current_boot or boot_id()):
        return None
    elapsed = clock.monotonic() - ticket.monotonic_at_capture
    return clock.now() - timedelta(seconds=elapsed)


def held_dir(state_dir: Path) -> Path:
    """Where records captured before the clock was synchronised wait for their names."""
    return Path(state_dir) / "held"


def held_count(state_dir: Path) -> int:
    """Records waiting for the clock (status and doctor show them)."""
    try:
        return sum(1 for p in held_dir(state_dir).iterdir() if (p / TICKET_NAME).exists())
    except FileNotFoundError:
        return 0


def undated_count(state_dir: Path) -> int:
    """Records held across a reboot, waiting for a person to date or discard them."""
    try:
        return sum(1 for p in (Path(state_dir) / "undated").iterdir() if p.is_dir())
    except FileNotFoundError:
        return 0


def hold(root: Path, files: dict[str, bytes], ticket: HoldTicket) -> Path:
    """Park a capture's files under root/<uuid>/ with its ticket (written last)."""
    folder = Path(root) / uuid.uuid4().hex
    make_dirs(folder)
    for name, data in files.items():
        atomic_write(folder / name, data)
    atomic_write(folder / TICKET_NAME, json.dumps(asdict(ticket)).encode())
    fsync_dir(root)
    log.warning("clock not synchronised: capture held in %s until the time is known", folder)
    return folder


@dataclass(frozen=True)
class HeldName:
    """The name a held record was given once the clock was known: its time and record id."""

    acquired_at: datetime
    record_id: str


def held_name(folder: Path) -> HeldName | None:
    """The name already chosen for a held record, or None when none was chosen yet."""
    try:
        doc = json.loads((Path(folder) / NAME_FILE).read_bytes())
        return HeldName(datetime.fromisoformat(doc["acquired_at"]), str(doc["record_id"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{Path(folder) / NAME_FILE}: unreadable ({exc})") from exc


def name_held(folder: Path, when: datetime, record_id: str) -> HeldName:
    """The held record's name: the one chosen before if any, else this one, made durable.

    Written (fsync'd file and folder) before anything is written under the name, so a crash
    anywhere after leaves a retry no choice but this name.
    """
    chosen = held_name(folder)
    if chosen is not None:
        return chosen
    name = HeldName(when.astimezone(), record_id)
    atomic_write(Path(folder) / NAME_FILE, json.dumps(
        {"acquired_at": name.acquired_at.isoformat(), "record_id": name.record_id}).encode())
    return name


def release_folder(folder: Path) -> None:
    """Remove a held folder whose record is packaged: its ticket first, so a crash part way
    leaves a folder no pass releases again (swept by `sweep_released`)."""
    folder = Path(folder)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folder / TICKET_NAME)
        fsync_dir(folder)
    shutil.rmtree(folder, ignore_errors=True)
    fsync_dir(folder.parent)


def sweep_released(root: Path) -> None:
    """Finish removing held folders a crash left part way (named, ticket already gone)."""
    try:
        folders = [p for p in Path(root).iterdir() if p.is_dir()]
    except FileNotFoundError:
        return
    for folder in folders:
        if (folder / NAME_FILE).exists() and not (folder / TICKET_NAME).exists():
            release_folder(folder)


def ready(root: Path, clock: Clock, *, current_boot: str | None = None
          ) -> tuple[list[tuple[Path, datetime]], list[Path]]:
    """Held captures that can be stamped now, and those from an earlier boot that never can.

    A capture already named (NAME_FILE) is stampable with that name whatever the clock or
    the boot: its name is chosen and may already be on a package.
    """
    stampable: list[tuple[Path, datetime]] = []
    orphaned: list[Path] = []
    root = Path(root)
    if not root.is_dir():
        return stampable, orphaned
    for ticket_path in sorted(root.glob(f"*/{TICKET_NAME}")):
        try:
            named = held_name(ticket_path.parent)
            if named is not None:
                stampable.append((ticket_path.parent, named.acquired_at))
                continue
            ticket = HoldTicket(**json.loads(ticket_path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            log.error("held capture %s has an unreadable ticket (%s); left in place",
                      ticket_path.parent, exc)
            continue
        if ticket.boot_id != (current_boot or boot_id()):
            orphaned.append(ticket_path.parent)
            continue
        when = stamp_for(ticket, clock, current_boot=current_boot)
        if when is not None:
            stampable.append((ticket_path.parent, when))
    return stampable, orphaned
