"""`device-agent verify [--json] [--repair]`: is everything delivered still in the bucket?

Exit 0 when every object is there and intact; 1 when any is missing or different (with
--repair they are queued again and the next sync pass sends them); 3 when S3 cannot be
reached.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from device_agent.commands import echo
from device_agent.core.config import Settings


def run(settings: Settings, args: argparse.Namespace) -> int:
    from device_agent.core.s3keys import display_key
    from device_agent.shipping.outbox import Outbox
    from device_agent.shipping.uploader import Uploader
    from device_agent.shipping.verify import delivered_items, repair, verify_objects

    with Outbox.open(settings) as outbox:
        expected = delivered_items(outbox)
        uploader = Uploader.from_settings(settings)
        uploader.check_bucket()
        findings = verify_objects(uploader, expected)
        problems = [f for f in findings if not f.ok]
        queued, lost = repair(outbox, problems) if args.repair and problems else ([], [])
    methods = sorted({f.method for f in findings})
    if args.json:
        echo(json.dumps({
            "bucket": uploader.bucket, "checked": len(findings), "problems": len(problems),
            "requeued": len(queued), "unrepairable": len(lost),
            # a report's key may carry its patient's name, a signup's its user's: a hash
            "findings": [{**asdict(f), "key": display_key(f.key), "ok": f.ok}
                         for f in findings],
        }, indent=2))
    else:
        width = max((len(f.status) for f in problems), default=0)
        for f in problems:
            found = "-" if f.actual_size is None else f"{f.actual_size} B"
            sha = "" if f.actual_sha256 is None else " sha256 " + f.actual_sha256[:12]
            echo(f"{f.status:<{width}}  s3://{uploader.bucket}/{display_key(f.key)}  expected "
                 f"{f.expected_size} B sha256 {f.expected_sha256[:12]}, found {found}{sha}")
        echo(f"verified {len(findings)} objects in s3://{uploader.bucket}: "
             f"{len(findings) - len(problems)} ok, {len(problems)} missing or different"
             + (f" (hash by {', '.join(methods)})" if methods else ""))
        if args.repair and problems:
            echo(f"repair: {len(queued)} queued again (the next sync pass sends them)"
                 + (f"; {len(lost)} cannot be: their local copies were pruned" if lost else ""))
        elif problems:
            echo("run `device-agent verify --repair` to send them again")
    return 1 if problems else 0
