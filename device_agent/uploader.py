"""S3 delivery: conditional puts that never overwrite, never duplicate, and say why they failed.

Every new object is put with `If-None-Match: *`, a SHA-256 checksum and server-side
encryption. A 412 means the key exists: equal SHA-256 is a retry whose first answer was lost
("already_delivered"); a different one is a real collision, kept under a deterministic
disambiguated key ("collision"). A modified report replaces its object only with `If-Match`.
Which failures are worth retrying is decided in one place, `classify_error`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from device_agent import s3keys
from device_agent.errors import UploadError

log = logging.getLogger(__name__)

CREATED = "created"
ALREADY_DELIVERED = "already_delivered"
COLLISION = "collision"
REPLACED = "replaced"
OUTCOMES = (CREATED, ALREADY_DELIVERED, COLLISION, REPLACED)

CONTENT_TYPES = {".pdf": "application/pdf", ".json": "application/json"}

# S3 error code -> (retryable, what to check). Anything not named: 5xx/409/429 retry, else not.
_CODES: dict[str, tuple[bool, str]] = {
    "AccessDenied": (False, "check the IAM policy allows s3:PutObject/GetObject on ecg-reports/* "
                            "(docs/s3-policy.md) and the bucket policy"),
    "AllAccessDisabled": (False, "access to the bucket is disabled; ask the bucket owner"),
    "AccountProblem": (False, "the AWS account has a problem; ask its owner"),
    "NoSuchBucket": (False, "check AWS_S3_BUCKET and AWS_S3_REGION"),
    "InvalidBucketName": (False, "check AWS_S3_BUCKET"),
    "PermanentRedirect": (False, "the bucket is in another region: check AWS_S3_REGION"),
    "AuthorizationHeaderMalformed": (False, "check AWS_S3_REGION matches the bucket"),
    "InvalidAccessKeyId": (False, "check AWS_ACCESS_KEY_ID (or the credential chain)"),
    "SignatureDoesNotMatch": (False, "check AWS_SECRET_ACCESS_KEY"),
    "ExpiredToken": (False, "the session token expired: refresh the credentials"),
    "InvalidToken": (False, "check AWS_SESSION_TOKEN"),
    "KMS.NotFoundException": (False, "check S3_SSE_KMS_KEY_ID"),
    "KMS.DisabledException": (False, "the KMS key is disabled: enable it or change "
                                     "S3_SSE_KMS_KEY_ID"),
    "InvalidArgument": (False, "the request was refused as malformed; report this bug"),
    "BadDigest": (False, "the SHA-256 sent does not match the body: the local file changed "
                         "while uploading; it is re-read on the next attempt"),
    "PreconditionFailed": (False, "the object changed behind the agent's back"),
    "NoSuchKey": (False, "the object does not exist"),
    "RequestTimeTooSkewed": (True, "the device clock is wrong: check NTP (timedatectl)"),
    "RequestTimeout": (True, "the network is slow; it will be retried"),
    "SlowDown": (True, "S3 is throttling; it will be retried"),
    "Throttling": (True, "S3 is throttling; it will be retried"),
    "ThrottlingException": (True, "S3 is throttling; it will be retried"),
    "RequestLimitExceeded": (True, "S3 is throttling; it will be retried"),
    "InternalError": (True, "S3 had an internal error; it will be retried"),
    "ServiceUnavailable": (True, "S3 is unavailable; it will be retried"),
    "OperationAborted": (True, "a conflicting operation is in progress; it will be retried"),
    "ConditionalRequestConflict": (True, "a concurrent write to the same key; it will be "
                                         "retried"),
}


def make_client(settings: Any) -> Any:
    """The process's one S3 client (thread-safe; build it once at the edge and pass it on)."""
    import boto3
    from botocore.config import Config

    session_args: dict[str, Any] = {}
    if settings.aws_access_key_id:
        session_args.update(
            aws_access_key_id=settings.aws_access_key_id,
            aws_secret_access_key=settings.aws_secret_access_key,
            aws_session_token=settings.aws_session_token,
        )
    elif settings.aws_profile:
        session_args["profile_name"] = settings.aws_profile
    session = boto3.session.Session(**session_args)
    config = Config(
        # botocore's "max_attempts" counts retries only; S3_MAX_ATTEMPTS means all attempts
        retries={"mode": "standard", "total_max_attempts": settings.s3_max_attempts},
        connect_timeout=settings.s3_connect_timeout_s,
        read_timeout=settings.s3_read_timeout_s,
        max_pool_connections=10,
    )
    return session.client(
        "s3",
        region_name=settings.s3_region or None,
        endpoint_url=settings.s3_endpoint_url or None,
        config=config,
    )


def classify_error(exc: BaseException, *, bucket: str, key: str | None) -> UploadError:
    """The one place that decides whether an S3 failure is worth retrying, and what to check."""
    from botocore import exceptions as bx

    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    if isinstance(exc, UploadError):
        return exc
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code") or "Unknown")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code == "404" and key is None:
            code = "NoSuchBucket"
        if code in _CODES:
            retryable, hint = _CODES[code]
        elif status >= 500 or status in (409, 429):
            retryable, hint = True, "a transient error at the service; it will be retried"
        else:
            retryable, hint = False, "the request was refused; check the bucket and credentials"
        return UploadError(f"{where}: {code} (HTTP {status}): {hint}", retryable=retryable,
                           code=code)
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return UploadError(
            f"{where}: no usable AWS credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "or AWS_PROFILE, or give the unit an instance role",
            retryable=False, code=type(exc).__name__,
        )
    if isinstance(exc, bx.NoRegionError):
        return UploadError(f"{where}: no region: set AWS_S3_REGION", retryable=False,
                           code="NoRegion")
    if isinstance(exc, bx.ParamValidationError):
        return UploadError(f"{where}: invalid request ({exc}); report this bug", retryable=False,
                           code="ParamValidation")
    if isinstance(exc, bx.ConnectTimeoutError | bx.ReadTimeoutError):
        return UploadError(
            f"{where}: timed out talking to S3: check the network; it will be retried",
            retryable=True, code="Timeout",
        )
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectionClosedError | bx.HTTPClientError
                  | ConnectionError | TimeoutError):
        return UploadError(
            f"{where}: cannot reach the S3 endpoint ({type(exc).__name__}): check the network, "
            "DNS and AWS_ENDPOINT_URL_S3; it will be retried",
            retryable=True, code="ConnectionError",
        )
    return UploadError(f"{where}: unexpected {type(exc).__name__}: {exc}", retryable=False,
                       code=type(exc).__name__)


@dataclass(frozen=True)
class PutResult:
    """Where an object ended up and why: created, already_delivered, collision or replaced."""

    requested_key: str
    key: str
    etag: str | None
    outcome: str


def _b64(sha256_hex: str) -> str:
    return base64.b64encode(binascii.unhexlify(sha256_hex)).decode("ascii")


def _hex_from_b64(value: str | None) -> str | None:
    if not value or "-" in value:  # "...-N" is a multipart composite, not the object's hash
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


def _is_precondition_failed(exc: BaseException) -> bool:
    response = getattr(exc, "response", None) or {}
    return (response.get("Error", {}).get("Code") == "PreconditionFailed"
            or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412)


def _is_not_found(exc: BaseException) -> bool:
    response = getattr(exc, "response", None) or {}
    return (response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")
            or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404)


class Uploader:
    """Conditional puts into one bucket through one shared client."""

    def __init__(self, client: Any, *, bucket: str, sse: str = "aes256",
                 kms_key_id: str | None = None,
                 clock: Callable[[], datetime] | None = None) -> None:
        if sse not in ("aes256", "aws:kms"):
            raise ValueError(f"sse {sse!r} is not aes256 or aws:kms")
        if sse == "aws:kms" and not kms_key_id:
            raise ValueError("sse aws:kms needs kms_key_id")
        self.client = client
        self.bucket = bucket
        self.sse = sse
        self.kms_key_id = kms_key_id
        self.clock = clock or (lambda: datetime.now().astimezone())

    @classmethod
    def from_settings(cls, settings: Any, client: Any | None = None) -> Uploader:
        """An Uploader for settings' bucket and encryption (client built if not given)."""
        if not settings.s3_bucket:
            raise UploadError("AWS_S3_BUCKET is not set: set it in .env", retryable=False,
                              code="NoBucketConfigured")
        return cls(client or make_client(settings), bucket=settings.s3_bucket,
                   sse=settings.s3_sse, kms_key_id=settings.s3_sse_kms_key_id)

    def _encryption(self) -> dict[str, str]:
        if self.sse == "aws:kms":
            return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": str(self.kms_key_id)}
        return {"ServerSideEncryption": "AES256"}

    def _put(self, key: str, body: bytes, sha256: str, metadata: Mapping[str, str],
             content_type: str, **condition: str) -> str | None:
        response = self.client.put_object(
            Bucket=self.bucket, Key=key, Body=body, ContentType=content_type,
            ChecksumAlgorithm="SHA256", ChecksumSHA256=_b64(sha256),
            Metadata=dict(metadata), **self._encryption(), **condition,
        )
        return response.get("ETag")

    def check_bucket(self) -> None:
        """Raise a classified UploadError unless the bucket exists and answers us."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise classify_error(exc, bucket=self.bucket, key=None) from exc

    def head(self, key: str) -> dict | None:
        """The object's size, ETag, SHA-256 (and where it came from) and metadata, or None."""
        try:
            r = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise classify_error(exc, bucket=self.bucket, key=key) from exc
        metadata = r.get("Metadata") or {}
        sha = _hex_from_b64(r.get("ChecksumSHA256"))
        source = "checksum" if sha else None
        if sha is None and metadata.get("sha256"):
            sha, source = metadata["sha256"].lower(), "metadata"
        return {
            "key": key,
            "size": int(r.get("ContentLength", 0)),
            "etag": r.get("ETag"),
            "sha256": sha,
            "sha256_source": source,
            "metadata": metadata,
            "server_side_encryption": r.get("ServerSideEncryption"),
            "version_id": r.get("VersionId"),
        }

    def remote_sha256(self, key: str, head: dict | None = None) -> tuple[str | None, str]:
        """(sha256, how it was learnt: checksum, metadata, get or missing) of an object."""
        head = head if head is not None else self.head(key)
        if head is None:
            return None, "missing"
        if head["sha256"]:
            return head["sha256"], head["sha256_source"]
        sha256 = self.download_sha256(key)
        return (sha256, "get") if sha256 is not None else (None, "missing")

    def download_sha256(self, key: str) -> str | None:
        """SHA-256 of an object's body, streamed (None if it is gone)."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            digest = hashlib.sha256()
            for chunk in iter(lambda: body.read(1 << 20), b""):
                digest.update(chunk)
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise classify_error(exc, bucket=self.bucket, key=key) from exc
        return digest.hexdigest()

    def _put_if_absent(self, key: str, body: bytes, sha256: str, metadata: Mapping[str, str],
                       content_type: str) -> tuple[str | None, str]:
        """(etag, "created" | "same" | "different"): put, and after a 412 compare SHA-256."""
        for _ in range(3):
            try:
                etag = self._put(key, body, sha256, metadata, content_type, IfNoneMatch="*")
                return etag, "created"
            except Exception as exc:
                if not _is_precondition_failed(exc):
                    raise classify_error(exc, bucket=self.bucket, key=key) from exc
            head = self.head(key)
            if head is None:
                continue  # deleted between our put and our head: put again
            remote, source = self.remote_sha256(key, head)
            log.debug("412 on s3://%s/%s: remote sha256 from %s", self.bucket, key, source)
            return head["etag"], "same" if remote == sha256 else "different"
        raise UploadError(f"s3://{self.bucket}/{key}: the object keeps appearing and "
                          "disappearing; another writer is racing the agent", retryable=True,
                          code="Race")

    def put_new(self, key: str, body: bytes, *, sha256: str, metadata: Mapping[str, str],
                content_type: str) -> PutResult:
        """Create an object that must not exist yet; a lost answer or a collision is handled."""
        sha256 = sha256.lower()
        _check_body(self.bucket, key, body, sha256)
        metadata = {"uploaded_at": self.clock().isoformat(), **metadata}
        etag, state = self._put_if_absent(key, body, sha256, metadata, content_type)
        if state == "created":
            return PutResult(key, key, etag, CREATED)
        if state == "same":
            log.info("s3://%s/%s was already delivered (an earlier answer was lost)",
                     self.bucket, key)
            return PutResult(key, key, etag, ALREADY_DELIVERED)
        alt = s3keys.disambiguated_key(key, sha256)
        etag, state = self._put_if_absent(alt, body, sha256, metadata, content_type)
        if state == "different":
            raise UploadError(f"s3://{self.bucket}/{alt}: holds yet another file; "
                              "inspect both objects by hand", retryable=False,
                              code="DoubleCollision")
        log.warning("s3://%s/%s holds a different file; ours is kept as %s", self.bucket, key,
                    alt)
        return PutResult(key, alt, etag, COLLISION)

    def replace(self, key: str, body: bytes, *, sha256: str, metadata: Mapping[str, str],
                content_type: str, if_match: str) -> PutResult:
        """Overwrite an object only while it is still the version the agent last saw."""
        _check_body(self.bucket, key, body, sha256)
        metadata = {"uploaded_at": self.clock().isoformat(), **metadata}
        try:
            etag = self._put(key, body, sha256, metadata, content_type, IfMatch=if_match)
        except Exception as exc:
            if _is_precondition_failed(exc) or _is_not_found(exc):
                raise UploadError(
                    f"s3://{self.bucket}/{key}: changed or removed behind the agent's back "
                    f"(no longer ETag {if_match}); not overwritten: compare the object with "
                    "the local file, then re-queue it as new or delete the queue entry",
                    retryable=False, code="PreconditionFailed",
                ) from exc
            raise classify_error(exc, bucket=self.bucket, key=key) from exc
        return PutResult(key, key, etag, REPLACED)


def _check_body(bucket: str, key: str, body: bytes, sha256: str) -> None:
    if hashlib.sha256(body).hexdigest() != sha256.lower():
        raise UploadError(f"s3://{bucket}/{key}: the local file no longer matches its recorded "
                          "SHA-256 (it changed after it was queued); re-queue it",
                          retryable=False, code="LocalFileChanged")


def content_type_for(name: str) -> str:
    """The Content-Type for a file name by its extension."""
    dot = name.rfind(".")
    return CONTENT_TYPES.get(name[dot:].lower() if dot >= 0 else "", "application/octet-stream")


def upload_package(uploader: Uploader, info: Any, *,
                   on_delivered: Callable[[Any, PutResult], None] | None = None,
                   max_workers: int = 3, skip: Collection[str] = ()) -> list[PutResult]:
    """The three data files in parallel, then the manifest once all three are confirmed.

    `on_delivered(file, result)` runs in the calling thread as each file is confirmed (so an
    SQLite outbox can commit it); `skip` names files already delivered earlier.
    """
    uploaded_at = uploader.clock()

    def put(file: Any) -> PutResult:
        body = file.path.read_bytes()
        meta = s3keys.object_metadata(file.kind, file.name, uploaded_at=uploaded_at,
                                    record_id=info.record_id, device_serial=info.device_serial,
                                    sha256=file.sha256)
        return uploader.put_new(info.key(file), body, sha256=file.sha256, metadata=meta,
                                content_type=content_type_for(file.name))

    results: list[PutResult] = []
    errors: list[UploadError] = []
    todo = [f for f in info.files if f.name not in skip]
    if todo:
        with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="s3-put") as pool:
            futures = {pool.submit(put, f): f for f in todo}
            for future in as_completed(futures):
                try:
                    result = future.result()
                except OSError as exc:
                    errors.append(UploadError(
                        f"{futures[future].path}: cannot read the package file ({exc}); "
                        "check the disk", retryable=False, code="LocalRead"))
                    continue
                except UploadError as exc:
                    errors.append(exc)
                    continue
                results.append(result)
                if on_delivered is not None:
                    on_delivered(futures[future], result)
    if errors:
        # a permanent failure is the one a person must act on; report it first
        errors.sort(key=lambda e: e.retryable)
        for extra in errors[1:]:
            log.error("%s", extra)
        raise errors[0]
    if info.manifest.name not in skip:
        result = put(info.manifest)
        results.append(result)
        if on_delivered is not None:
            on_delivered(info.manifest, result)
    return results
