"""`device-agent status [--json]` and `device-agent queue list|retry|add`.

status exits 1 when the service is stopped, hung or wedged (the first line says which, and
why); 3 when it runs but an external part is unavailable (status.unavailable: uploads
paused, board absent, clock not synchronised, disk under the reserve; the last line names
them); 0 when it runs and has every part it needs. Both import nothing heavy: status
answers in a second on a slow board.
"""

from __future__ import annotations

import argparse
import json

from device_agent.commands import echo
from device_agent.core.config import Settings
from device_agent.ops.status import StatusReport, collect_status, iso, unavailable


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}min"
    return f"{seconds / 3600:.1f}h"


def render_status(s: StatusReport) -> list[str]:
    """The human view of collect_status(): one fact a line, problems in capitals."""
    svc, port, box, disk = s["service"], s["port"], s["outbox"], s["disk"]
    lines = []
    if not svc["running"]:
        lines.append("service      STOPPED (start: systemctl start device-agent)")
    elif svc["state"] == "hung":
        lines.append(f"service      HUNG (pid {svc['pid']}: status {_age(svc['status_age_s'])} "
                     "old; systemd's watchdog restarts it, or: systemctl restart "
                     "device-agent)")
    elif svc["state"] == "wedged":
        lines.append(f"service      WEDGED (pid {svc['pid']}): {svc['stuck']}")
    else:
        lines.append(f"service      {svc['state']} (pid {svc['pid']}, status "
                     f"{_age(svc['status_age_s'])} old)")
    present = {True: "present", False: "ABSENT (plug in the board's USB cable)",
               None: "url"}[port["present"]]
    if port["connected"] is None:
        link = "not read (service not running)"
    elif port["frames_flowing"]:
        link = f"frames flowing ({port['frames']} decoded, {port['reconnects']} reconnects)"
    elif port["connected"]:
        link = f"open but SILENT for {_age(port['last_byte_age_s'])} (is the board on?)"
    else:
        link = "NOT CONNECTED" + (f": {port['error']}" if port["error"] else "")
    lines.append(f"serial port  {port['path']} {present}; {link}")
    cap = s["last_capture"]
    if cap:
        what = cap.get("verdict") or ("FAILED: " + str(cap.get("error")))
        decided = f" ({cap['disposition']})" if cap.get("disposition") else ""
        lines.append(f"last capture {cap.get('at')} {what}{decided} {cap.get('folder') or ''}"
                     .rstrip())
    elif box.get("last_package_stamp"):
        lines.append(f"last capture {box['last_package_stamp']} "
                     f"({box['last_package_disposition']}, at {box['last_package_at']})")
    else:
        lines.append("last capture none")
    if s["held"]:
        lines.append(f"held         {s['held']} record(s) waiting for the clock to be named")
    if s["undated"]:
        lines.append(f"undated      {s['undated']} record(s) held across a reboot: name or "
                     "delete them (doctor says where)")
    if box.get("error"):
        lines.append(f"outbox       ERROR {box['error']}")
    else:
        lines.append(f"outbox       {box['pending']} pending (oldest "
                     f"{_age(box['oldest_pending_age_s'])}), {box['failed']} failed, "
                     f"{box['delivered']} delivered; {box['withheld']} withheld, "
                     f"{box['rejected']} rejected (never uploaded)")
        if box.get("pause_reason"):
            lines.append(f"uploads      PAUSED until {box['paused_until']}: "
                         f"{box['pause_reason']}")
        if box.get("problems"):
            lines.append(f"inputs       {box['problems']} SKIPPED (see `device-agent queue "
                         "list`)")
        lines.append(f"last upload  {box['last_upload_at'] or 'never'}")
        if box["last_error"]:
            lines.append(f"last error   {box['last_error']}")
    clock = {True: "synchronised", False: "NOT SYNCHRONISED", None: "unknown"}[
        s["clock"]["synced"]]
    lines.append(f"clock        {clock} ({s['clock']['reason']}; as {s['clock_source']} "
                 "sees it)")
    lines.append(f"disk         {disk['free_mb']} MB free on {disk['path']} (reserve "
                 f"{disk['reserve_mb']} MB){'' if disk['ok'] else ' LOW: free space'}")
    return lines


def status(settings: Settings, args: argparse.Namespace) -> int:
    s = collect_status(settings)
    lacking = unavailable(s)
    if args.json:
        echo(json.dumps(s, indent=2, sort_keys=True))
    else:
        for line in render_status(s):
            echo(line)
        if lacking:
            echo(f"unavailable  {', '.join(lacking).upper()} (exit 3: see the lines above)")
    if not s["service"]["healthy"]:
        return 1
    return 3 if lacking else 0


def queue(settings: Settings, args: argparse.Namespace) -> int:
    from device_agent.shipping.outbox import DELIVERED, Outbox

    with Outbox.open(settings) as box:
        if args.queue_command == "list":
            items = box.items.all() if args.all else box.items.undelivered()
            from device_agent.core.s3keys import display_key

            # a report's key may carry its patient's name, a signup's its user's: a hash
            rows = [{"id": i.id, "state": i.state, "kind": i.kind,
                     "key": display_key(i.final_key or i.key),
                     "attempts": i.attempts, "created_at": iso(i.created_at),
                     "next_attempt_at": iso(i.next_attempt_at) if i.next_attempt_at else None,
                     "last_error": i.last_error} for i in items
                    if args.all or i.state != DELIVERED]
            kept = [{"folder": p.folder, "stamp": p.stamp, "disposition": p.disposition,
                     "reason": p.reason} for p in box.packages.recent(200)
                    if p.disposition != "queued"]
            skipped = [{"source": p.source, "ref": p.ref, "reason": p.reason,
                        "since": iso(p.first_seen)} for p in box.problems.all()]
            paused = box.pause.current()
            if args.json:
                echo(json.dumps({"items": rows, "not_uploaded": kept, "skipped": skipped,
                                 "paused": None if paused is None else
                                 {"until": iso(paused[0]), "reason": paused[1]}}, indent=2))
                return 0
            if paused is not None:
                echo(f"uploads paused until {iso(paused[0])}: {paused[1]}")
            for r in rows:
                err = f"  ({r['last_error']})" if r["last_error"] else ""
                echo(f"{r['id']:>6} {r['state']:<9} {r['attempts']:>3}x {r['key']}{err}")
            echo(f"{len(rows)} item(s)")
            for k in kept:
                echo(f"not uploaded  {k['stamp']} {k['disposition']}: {k['reason']} "
                     f"({k['folder']})")
            for p in skipped:
                echo(f"skipped       {p['source']} {p['ref']}: {p['reason']}")
            return 0
        if args.queue_command == "add":
            from device_agent.shipping.enqueue import queue_folder

            info = queue_folder(args.folder, box)
            echo(f"package {info.stamp} queued for upload (the next sync pass sends it)")
            return 0
        if args.failed:
            echo(f"{box.items.retry_failed()} failed item(s) queued again")
            return 0
        if args.id is None:
            echo("queue retry needs an ID (see `device-agent queue list`) or --failed", err=True)
            return 2
        if not box.items.retry(args.id):
            echo(f"no undelivered outbox item {args.id} (see `device-agent queue list`; for "
                 "a delivered object that verify found missing, use `verify --repair`)",
                 err=True)
            return 1
        echo(f"item {args.id} queued again")
        return 0
