"""One request against a misbehaving server, made in a forked child: how it ended, how long
it took, and the child's peak RSS (getrusage RUSAGE_CHILDREN, so nothing else counts).

    python -m tests.functional.transport_probe CASE URL [CA_FILE CERT_FILE KEY_FILE]

prints one JSON line. Cases: put, get (a download read to its end), verify-get (a download
of an object whose HEAD said 1000 bytes), credentials (the IoT credentials fetch).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

BUCKET = "probe-bucket"
KNOWN_SIZE = 1000
# small numbers so a case ends quickly: 3 s for a request, 8 MiB the largest body
DEADLINES = {"connect_timeout_s": 1.0, "read_timeout_s": 2.0, "min_rate_bps": 16 * 1024.0,
             "max_body_bytes": 8 << 20, "attempts": 1}


def run_case(case: str, url: str, extra: list[str]) -> dict[str, object]:
    """Make the one request; what it raised (or "completed") and the seconds it took."""
    import boto3
    from botocore.config import Config

    from device_agent.shipping import transport
    from device_agent.shipping.credentials import IotConfig, IotCredentialFetcher
    from device_agent.shipping.deadline import Deadlines
    from device_agent.shipping.uploader import Uploader

    deadlines = Deadlines(**DEADLINES)  # type: ignore[arg-type]
    started = time.monotonic()
    outcome, code, read = "completed", None, 0
    try:
        if case == "credentials":
            ca_file, cert_file, key_file = extra
            config = IotConfig(endpoint=url, role_alias="probe", thing_name="SN-PROBE",
                               cert_file=cert_file, key_file=key_file, ca_file=ca_file)
            IotCredentialFetcher(config, deadline_s=deadlines.request_s(0),
                                 connect_timeout_s=deadlines.connect_timeout_s).fetch()
        else:
            client = boto3.session.Session().client(
                "s3", endpoint_url=url, region_name="us-east-1",
                config=Config(retries={"mode": "standard", "total_max_attempts": 1},
                              connect_timeout=1, read_timeout=2))
            transport.install(client, deadlines)
            if case == "put":
                client.put_object(Bucket=BUCKET, Key="probe.json", Body=b"{}")
            elif case == "get":
                body = client.get_object(Bucket=BUCKET, Key="probe.json")["Body"]
                for chunk in iter(lambda: body.read(1 << 20), b""):
                    read += len(chunk)
            elif case == "verify-get":
                Uploader(client, bucket=BUCKET).download_sha256("probe.json", KNOWN_SIZE)
            else:
                raise SystemExit(f"unknown case {case!r}")
    except Exception as exc:
        outcome, code = type(exc).__name__, getattr(exc, "code", None)
    return {"case": case, "outcome": outcome, "code": code, "read": read,
            "elapsed_s": round(time.monotonic() - started, 2),
            "deadline_s": deadlines.request_s(0), "cap_s": deadlines.cap_s}


def main(argv: list[str]) -> int:
    case, url, *extra = argv
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing imported yet but the standard library
        os.close(reader)
        try:
            result = run_case(case, url, extra)
        except BaseException as exc:
            result = {"case": case, "outcome": f"probe failed: {exc!r}"}
        os.write(writer, json.dumps(result).encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    result = json.loads(data)
    # ru_maxrss is in KiB on Linux
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
