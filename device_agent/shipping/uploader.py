"""S3 delivery: conditional puts that never overwrite, never duplicate, and prove they landed.

Every new object is put with `If-None-Match: *`, a SHA-256 checksum, server-side encryption
and a `device` tag (the bucket policy lets a unit read back only objects it tagged). A put
counts only when S3 proves it: the answer carries an ETag and echoes our SHA-256, or a HEAD
shows the object with our checksum; a `200 OK` from a captive portal proves nothing and is
retried. A 412 means the key exists: equal SHA-256 is a retry whose first answer was lost
("already_delivered"); an earlier version of the same file that we sent is replaced with
`If-Match` ("replaced"); anything else is a real collision, kept under a deterministic
disambiguated key ("collision"). Which failures are worth retrying, and whether they belong
to one object or to the whole queue, is decided in one place: `classify_error`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import boto3
from botocore import exceptions as bx
from botocore.config import Config

from device_agent.core import s3keys
from device_agent.core.clock import local_now
from device_agent.core.config import Settings
from device_agent.core.errors import ConfigError, Scope, UploadError
from device_agent.shipping import transport
from device_agent.shipping.credentials import (
    IotCredentialFetcher,
    config_from_settings,
    iot_session,
)
from device_agent.shipping.deadline import Deadlines

log = logging.getLogger(__name__)

CREATED = "created"
ALREADY_DELIVERED = "already_delivered"
COLLISION = "collision"
REPLACED = "replaced"
OWNER_TAG = "device"

_QUEUE_HINT_RETRY = "; the queue waits and retries"
# S3 error code -> (retryable, scope, what to check). Codes about the object itself are the
# only permanent ones; anything about credentials, policy, bucket or endpoint pauses the
# whole queue and is retried with backoff (credentials get fixed or refreshed).
_CODES: dict[str, tuple[bool, Scope, str]] = {
    "AccessDenied": (True, "queue", "check the IAM policy allows s3:PutObject and "
                                    "s3:PutObjectTagging on ecg-reports/* (docs/s3-policy.md)"),
    "AllAccessDisabled": (True, "queue", "access to the bucket is disabled; ask its owner"),
    "AccountProblem": (True, "queue", "the AWS account has a problem; ask its owner"),
    "NoSuchBucket": (True, "queue", "the bucket does not exist: check AWS_S3_BUCKET and "
                                    "AWS_S3_REGION"),
    "InvalidBucketName": (True, "queue", "check AWS_S3_BUCKET"),
    "PermanentRedirect": (True, "queue", "the bucket is in another region: check "
                                         "AWS_S3_REGION"),
    "AuthorizationHeaderMalformed": (True, "queue", "check AWS_S3_REGION matches the bucket"),
    "InvalidAccessKeyId": (True, "queue", "check AWS_ACCESS_KEY_ID (or the credential chain)"),
    "SignatureDoesNotMatch": (True, "queue", "check AWS_SECRET_ACCESS_KEY"),
    "ExpiredToken": (True, "queue", "the session token expired: refresh the credentials"),
    "TokenRefreshRequired": (True, "queue", "the session token expired: refresh the "
                                            "credentials"),
    "InvalidToken": (True, "queue", "check AWS_SESSION_TOKEN"),
    "KMS.NotFoundException": (True, "queue", "check S3_SSE_KMS_KEY_ID"),
    "KMS.DisabledException": (True, "queue", "the KMS key is disabled: enable it or change "
                                             "S3_SSE_KMS_KEY_ID"),
    "InvalidArgument": (True, "queue", "the endpoint refused the request as malformed: check "
                                       "S3_SSE and AWS_ENDPOINT_URL_S3"),
    "NoCredentials": (True, "queue", "no usable AWS credentials: set AWS_ACCESS_KEY_ID/"
                                     "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the AWS IoT "
                                     "certificate settings"),
    "NoRegion": (True, "queue", "no region: set AWS_S3_REGION"),
    "Unproven": (True, "queue", "the endpoint answered but did not prove it stored the object "
                                "(no ETag and SHA-256 echo): a captive portal, proxy or wrong "
                                "AWS_ENDPOINT_URL_S3?"),
    "Timeout": (True, "queue", "timed out talking to S3: check the network"),
    "AnswerTooLarge": (True, "queue", "the endpoint answered with more than S3 sends (a proxy "
                                      "or portal in the way, or a wrong AWS_ENDPOINT_URL_S3?)"),
    "ConnectionError": (True, "queue", "cannot reach the S3 endpoint: check the network, DNS "
                                       "and AWS_ENDPOINT_URL_S3"),
    "CertificateRejected": (True, "queue", "the credentials provider refused the unit's "
                                           "certificate: check AWS_IOT_CERT_FILE"),
    "TLSError": (True, "queue", "TLS failed (a proxy or portal intercepting HTTPS, or a wrong "
                                "CA?): check the network and AWS_ENDPOINT_URL_S3"),
    "RequestTimeTooSkewed": (True, "queue", "the device clock is wrong: check NTP "
                                            "(timedatectl)"),
    "RequestTimeout": (True, "queue", "the network is slow"),
    "SlowDown": (True, "queue", "S3 is throttling"),
    "Throttling": (True, "queue", "S3 is throttling"),
    "ThrottlingException": (True, "queue", "S3 is throttling"),
    "RequestLimitExceeded": (True, "queue", "S3 is throttling"),
    "InternalError": (True, "queue", "S3 had an internal error"),
    "ServiceUnavailable": (True, "queue", "S3 is unavailable"),
    "OperationAborted": (True, "item", "a conflicting operation is in progress on this key"),
    "ConditionalRequestConflict": (True, "item", "a concurrent write to the same key"),
    "BadDigest": (True, "item", "the body did not match its SHA-256 on arrival; it is sent "
                                "again"),
    "KeyTooLongError": (False, "item", "the key is too long for S3"),
    "EntityTooLarge": (False, "item", "the file is larger than S3 accepts in one put"),
    "MetadataTooLarge": (False, "item", "the object's metadata is too large"),
    "LocalFileMissing": (False, "item", "the local file is gone; nothing can be delivered"),
    "LocalFileChanged": (False, "item", "the local file changed after it was queued; "
                                        "inspect it, then `device-agent queue retry ID`"),
    "DoubleCollision": (False, "item", "two other files hold this key and its alternative; "
                                       "inspect both objects"),
    "PreconditionFailed": (False, "item", "the object changed behind the agent's back; not "
                                          "overwritten: compare it with the local file"),
}


@dataclass
class CredentialSource:
    """Where the client's credentials come from, for `status`; never the secrets."""

    kind: str
    fetcher: IotCredentialFetcher | None = None

    def describe(self) -> dict[str, str | None]:
        return {"source": self.kind,
                "expires_at": self.fetcher.last_expiry if self.fetcher else None}


def make_session(settings: Settings, deadlines: Deadlines
                 ) -> tuple[boto3.session.Session, CredentialSource]:
    """A boto3 session: the unit's certificate (AWS IoT), static keys, a profile, or the
    default chain, in that order of what is configured (config.py refuses two at once)."""
    if settings.iot_endpoint:
        session, fetcher = iot_session(config_from_settings(settings),
                                       deadline_s=deadlines.request_s(0),
                                       connect_timeout_s=deadlines.connect_timeout_s)
        return session, CredentialSource(f"AWS IoT certificate (thing {settings.thing_name})",
                                         fetcher)
    if settings.aws_access_key_id:
        return boto3.session.Session(
            aws_access_key_id=settings.aws_access_key_id,
            aws_secret_access_key=settings.aws_secret_access_key,
            aws_session_token=settings.aws_session_token,
        ), CredentialSource("static keys (AWS_ACCESS_KEY_ID)")
    if settings.aws_profile:
        try:
            session = boto3.session.Session(profile_name=settings.aws_profile)
        except bx.ProfileNotFound:
            raise ConfigError(f"AWS_PROFILE={settings.aws_profile}: no such profile in this "
                              "user's AWS config or credentials file (AWS_CONFIG_FILE, "
                              "AWS_SHARED_CREDENTIALS_FILE, ~/.aws): add it there, or set "
                              "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY instead") from None
        return session, CredentialSource(f"profile {settings.aws_profile}")
    return boto3.session.Session(), CredentialSource("boto3 default chain")


def make_client(settings: Settings, deadlines: Deadlines | None = None) -> Any:
    """The process's one S3 client: explicit timeouts, a total deadline per request."""
    return make_client_and_source(settings, deadlines)[0]


def make_client_and_source(settings: Settings, deadlines: Deadlines | None = None
                           ) -> tuple[Any, CredentialSource]:
    """make_client, and where its credentials come from; `deadlines` default: the settings'."""
    deadlines = deadlines or Deadlines.from_settings(settings)
    session, source = make_session(settings, deadlines)
    config = Config(
        # botocore's "max_attempts" counts retries only; S3_MAX_ATTEMPTS means all attempts
        retries={"mode": "standard", "total_max_attempts": deadlines.attempts},
        connect_timeout=deadlines.connect_timeout_s,
        read_timeout=deadlines.read_timeout_s,
        max_pool_connections=10,
    )
    client = session.client("s3", region_name=settings.s3_region or None,
                            endpoint_url=settings.s3_endpoint_url or None, config=config)
    transport.install(client, deadlines)
    return client, source


def classify_error(exc: BaseException, *, bucket: str, key: str | None) -> UploadError:
    """The one place that decides whether an S3 failure is worth retrying, and how far it
    reaches (this object, or the whole queue), and what a person should check."""
    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    if isinstance(exc, UploadError):
        return exc
    status = 0
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code") or "Unknown")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code == "404" and key is None:
            code = "NoSuchBucket"
        elif code == "403":
            code = "AccessDenied"
    elif isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        code = "NoCredentials"
    elif isinstance(exc, bx.NoRegionError):
        code = "NoRegion"
    elif isinstance(exc, transport.AnswerTooLarge):
        code = "AnswerTooLarge"
    elif isinstance(exc, bx.ConnectTimeoutError | bx.ReadTimeoutError | TimeoutError):
        code = "Timeout"
    elif isinstance(exc, bx.EndpointConnectionError | bx.ConnectionClosedError
                    | bx.HTTPClientError | ConnectionError):
        code = "ConnectionError"
    elif isinstance(exc, bx.SSLError):
        code = "TLSError"
    elif isinstance(exc, bx.ParamValidationError):
        return UploadError(f"{where}: invalid request ({exc}); report this bug",
                           retryable=False, code="ParamValidation", scope="item")
    else:  # not the endpoint's answer: a bug on this item's path; back this item off
        return UploadError(f"{where}: unexpected {type(exc).__name__}: {exc}", retryable=True,
                           code=type(exc).__name__, scope="item")
    if code in _CODES:
        retryable, scope, hint = _CODES[code]
    else:
        # Not named: a proxy's 403/404/400 without an S3 code, a 5xx, a new error. Nothing
        # here is about this object, so the queue waits and retries; nothing is given up.
        retryable, scope, hint = True, "queue", "an unexpected answer from the endpoint"
    answer = f" (HTTP {status})" if status else ""
    tail = _QUEUE_HINT_RETRY if scope == "queue" else ("; it is retried" if retryable else "")
    return UploadError(f"{where}: {code}{answer}: {hint}{tail}", retryable=retryable, code=code,
                       scope=scope)


@dataclass(frozen=True)
class PutResult:
    """Where an object ended up and why: created, already_delivered, collision or replaced."""

    requested_key: str
    key: str
    etag: str | None
    outcome: str


@dataclass(frozen=True)
class Head:
    """What a HEAD says about an object: size, ETag, SHA-256 and where the hash came from."""

    key: str
    size: int
    etag: str | None
    sha256: str | None
    sha256_source: str | None  # "checksum" (S3's own) or "metadata" (ours, never proof)
    metadata: Mapping[str, str]


def _b64(sha256_hex: str) -> str:
    return base64.b64encode(binascii.unhexlify(sha256_hex)).decode("ascii")


def _hex_from_b64(value: object) -> str | None:
    if not isinstance(value, str) or not value or "-" in value:  # "-N": multipart composite
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


def _status(exc: BaseException) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    return (str(response.get("Error", {}).get("Code", "")),
            int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0))


def _is_precondition_failed(exc: BaseException) -> bool:
    code, status = _status(exc)
    return code == "PreconditionFailed" or status == 412


def _is_not_found(exc: BaseException) -> bool:
    code, status = _status(exc)
    return code in ("404", "NoSuchKey", "NotFound") or status == 404


class Uploader:
    """Conditional, proven puts into one bucket through one shared client."""

    def __init__(self, client: Any, *, bucket: str, sse: str = "aes256",
                 kms_key_id: str | None = None, owner: str | None = None,
                 clock: Callable[[], datetime] = local_now,
                 deadlines: Deadlines | None = None) -> None:
        if sse not in ("aes256", "aws:kms"):
            raise ValueError(f"sse {sse!r} is not aes256 or aws:kms")
        if sse == "aws:kms" and not kms_key_id:
            raise ValueError("sse aws:kms needs kms_key_id")
        self.client = client
        self.bucket = bucket
        self.sse = sse
        self.kms_key_id = kms_key_id
        self.owner = owner
        self.clock = clock
        self.deadlines = deadlines or Deadlines()
        self.credentials = CredentialSource("given client")

    @classmethod
    def from_settings(cls, settings: Settings, client: Any | None = None) -> Uploader:
        """An Uploader for settings' bucket and encryption (client built if not given)."""
        if not settings.s3_bucket:
            raise UploadError("AWS_S3_BUCKET is not set: set it in the env file",
                              retryable=True, code="NoBucketConfigured", scope="queue")
        source = CredentialSource("given client")
        deadlines = Deadlines.from_settings(settings)  # one value: transport and watchdog
        if client is None:
            client, source = make_client_and_source(settings, deadlines)
        uploader = cls(client, bucket=settings.s3_bucket,
                       sse=settings.s3_sse, kms_key_id=settings.s3_sse_kms_key_id,
                       owner=settings.thing_name, deadlines=deadlines)
        uploader.credentials = source
        return uploader

    def max_duration_s(self, size: int) -> float:
        """The longest one put of `size` bytes can legitimately take, retries included."""
        return self.deadlines.put_total_s(size)

    def _extra(self) -> dict[str, str]:
        extra = {"ServerSideEncryption": "AES256"}
        if self.sse == "aws:kms":
            extra = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": str(self.kms_key_id)}
        if self.owner:
            extra["Tagging"] = f"{OWNER_TAG}={self.owner}"
        return extra

    def _put(self, key: str, body: bytes, sha256: str, metadata: Mapping[str, str],
             content_type: str, **condition: str) -> str:
        """One put; returns its ETag once S3 has proved it stored exactly `body`."""
        response = self.client.put_object(
            Bucket=self.bucket, Key=key, Body=body, ContentType=content_type,
            ChecksumAlgorithm="SHA256", ChecksumSHA256=_b64(sha256),
            Metadata=dict(metadata), **self._extra(), **condition,
        )
        etag = response.get("ETag")
        if etag and _hex_from_b64(response.get("ChecksumSHA256")) == sha256:
            return str(etag)
        head = self.head(key)  # the answer did not prove it; the object itself may
        if (head is not None and head.sha256_source == "checksum" and head.sha256 == sha256
                and head.size == len(body) and head.etag):
            return head.etag
        raise UploadError(f"s3://{self.bucket}/{key}: Unproven: {_CODES['Unproven'][2]}"
                          f"{_QUEUE_HINT_RETRY}", retryable=True, code="Unproven", scope="queue")

    def check_bucket(self) -> None:
        """Raise a classified UploadError unless the bucket exists and answers us."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise classify_error(exc, bucket=self.bucket, key=None) from exc

    def head(self, key: str) -> Head | None:
        """What S3 says about one object, or None if it does not exist."""
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
            sha, source = str(metadata["sha256"]).lower(), "metadata"
        return Head(key, int(r.get("ContentLength", 0)), r.get("ETag"), sha, source,
                    metadata)

    def download_sha256(self, key: str, size: int) -> str | None:
        """SHA-256 of an object's body, streamed (None if it is gone); `size` is what its HEAD
        said it holds: an answer announcing or carrying more is not the object, and is cut."""
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
            body = answer["Body"]
            try:
                if int(answer.get("ContentLength") or 0) > size:
                    raise self._not_the_object(key, size)
                digest = hashlib.sha256()
                read = 0
                for chunk in iter(lambda: body.read(1 << 20), b""):
                    read += len(chunk)
                    if read > size:
                        raise self._not_the_object(key, size)
                    digest.update(chunk)
            finally:
                body.close()
        except UploadError:
            raise
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise classify_error(exc, bucket=self.bucket, key=key) from exc
        return digest.hexdigest()

    def _not_the_object(self, key: str, size: int) -> UploadError:
        return UploadError(f"s3://{self.bucket}/{key}: the download ran past the {size} bytes "
                           f"its HEAD reported: {_CODES['AnswerTooLarge'][2]}{_QUEUE_HINT_RETRY}",
                           retryable=True, code="AnswerTooLarge", scope="queue")

    def list_prefix(self, prefix: str) -> dict[str, tuple[str, int]]:
        """key -> (ETag, size) of every object under `prefix` (one LIST, paginated)."""
        found: dict[str, tuple[str, int]] = {}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", ()):
                    found[obj["Key"]] = (str(obj.get("ETag", "")), int(obj.get("Size", 0)))
        except Exception as exc:
            raise classify_error(exc, bucket=self.bucket, key=prefix) from exc
        return found

    def _remote_sha256(self, head: Head) -> str | None:
        """The object's SHA-256 for a 412 comparison; None when it cannot be known (another
        unit's object the policy does not let us read, or one stored without a checksum)."""
        if head.sha256_source == "checksum":
            return head.sha256
        try:
            return self.download_sha256(head.key, head.size)
        except UploadError as exc:
            if exc.code == "AccessDenied":
                return None
            raise

    def _put_if_absent(self, key: str, body: bytes, sha256: str, metadata: Mapping[str, str],
                       content_type: str) -> tuple[str | None, str, Head | None]:
        """(etag, "created" | "same" | "different", head): put, after a 412 compare SHA-256."""
        for _ in range(3):
            try:
                return self._put(key, body, sha256, metadata, content_type,
                                 IfNoneMatch="*"), "created", None
            except UploadError:
                raise
            except Exception as exc:
                if not _is_precondition_failed(exc):
                    raise classify_error(exc, bucket=self.bucket, key=key) from exc
            try:
                head = self.head(key)
            except UploadError as exc:
                if exc.code != "AccessDenied":
                    raise
                return None, "different", None  # not ours to read: another unit's object
            if head is None:
                continue  # deleted between our put and our head: put again
            remote = self._remote_sha256(head)
            return head.etag, "same" if remote == sha256 else "different", head
        raise UploadError(f"s3://{self.bucket}/{key}: the object keeps appearing and "
                          "disappearing; another writer is racing the agent", retryable=True,
                          code="Race", scope="item")

    def put_new(self, key: str, body: bytes, *, sha256: str, metadata: Mapping[str, str],
                content_type: str, ours: Collection[str] = ()) -> PutResult:
        """Create an object that must not exist yet; a lost answer or a collision is handled.

        `ours` are SHA-256s of earlier contents of this same file that the agent sent: an
        object holding one of them is replaced (If-Match), whatever became of the answer.
        """
        sha256 = sha256.lower()
        _check_body(self.bucket, key, body, sha256)
        metadata = {"uploaded_at": self.clock().isoformat(), **metadata}
        etag, state, head = self._put_if_absent(key, body, sha256, metadata, content_type)
        if state == "created":
            return PutResult(key, key, etag, CREATED)
        if state == "same":
            log.info("s3://%s/%s was already delivered (an earlier answer was lost)",
                     self.bucket, s3keys.display_name(key.rsplit("/", 1)[-1]))
            return PutResult(key, key, etag, ALREADY_DELIVERED)
        if head is not None and head.etag and self._remote_sha256(head) in set(ours):
            result = self.replace(key, body, sha256=sha256, metadata=metadata,
                                  content_type=content_type, if_match=head.etag, ours=ours)
            log.info("replaced an earlier version of %s that an unanswered put had left",
                     s3keys.display_name(key.rsplit("/", 1)[-1]))
            return result
        alt = s3keys.disambiguated_key(key, sha256)
        etag, state, _ = self._put_if_absent(alt, body, sha256, metadata, content_type)
        if state == "different":
            raise UploadError(f"s3://{self.bucket}/{alt}: holds yet another file; inspect "
                              "both objects by hand", retryable=False, code="DoubleCollision")
        log.warning("s3://%s holds a different file at %s; ours is kept under %s", self.bucket,
                    s3keys.display_name(key.rsplit("/", 1)[-1]),
                    s3keys.display_name(alt.rsplit("/", 1)[-1]))
        return PutResult(key, alt, etag, COLLISION)

    def replace(self, key: str, body: bytes, *, sha256: str, metadata: Mapping[str, str],
                content_type: str, if_match: str, ours: Collection[str] = ()) -> PutResult:
        """Overwrite an object only while it is still a version the agent put."""
        sha256 = sha256.lower()
        _check_body(self.bucket, key, body, sha256)
        metadata = {"uploaded_at": self.clock().isoformat(), **metadata}
        for _ in range(3):
            try:
                etag = self._put(key, body, sha256, metadata, content_type, IfMatch=if_match)
                return PutResult(key, key, etag, REPLACED)
            except UploadError:
                raise
            except Exception as exc:
                if not (_is_precondition_failed(exc) or _is_not_found(exc)):
                    raise classify_error(exc, bucket=self.bucket, key=key) from exc
            head = self.head(key)
            remote = None if head is None else self._remote_sha256(head)
            if head is not None and remote == sha256:
                return PutResult(key, key, head.etag, ALREADY_DELIVERED)  # our answer was lost
            if head is None or not head.etag or remote not in set(ours):
                break
            if_match = head.etag  # still one of ours: replace that version
        raise UploadError(
            f"s3://{self.bucket}/{key}: changed or removed behind the agent's back (no longer "
            "a version it put); not overwritten: compare the object with the local file",
            retryable=False, code="PreconditionFailed")


def _check_body(bucket: str, key: str, body: bytes, sha256: str) -> None:
    if hashlib.sha256(body).hexdigest() != sha256.lower():
        raise UploadError(f"s3://{bucket}/{key}: the local file no longer matches its recorded "
                          "SHA-256 (it changed after it was queued); re-queue it",
                          retryable=False, code="LocalFileChanged")
