"""The agent's small error hierarchy, on the builtins.

Every message names the device, file, bucket or key involved and says what to do, and
never carries a patient's identity or a secret. `exit_code` is what a command returns when
the error reaches it (README, exit codes).
"""

from __future__ import annotations

from typing import Literal

# How far an upload failure reaches: "item" is about this one object (its local file, its
# key); "queue" is about the endpoint, the credentials or the bucket, so every item would
# meet it and the whole queue pauses instead.
Scope = Literal["item", "queue"]


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""

    exit_code = 1


class ConfigError(AgentError, ValueError):
    """A setting is missing or invalid."""

    exit_code = 2


class SerialLinkError(AgentError, OSError):
    """The serial port cannot be opened or read (unplugged adapter, busy port, permissions)."""

    exit_code = 3


class CaptureRejected(AgentError):
    """A capture lost too much signal to be trusted; the record is kept, marked rejected."""

    exit_code = 1


class DiskSpaceError(AgentError, OSError):
    """Free space under the configured reserve, or a write met a full disk."""

    exit_code = 3


class UploadError(AgentError):
    """An S3 operation failed; `retryable` says whether trying later can help.

    `scope` says whether the failure belongs to this object alone ("item") or to the
    endpoint, credentials or bucket ("queue"): a queue-scope failure pauses the whole queue
    with backoff and is never a reason to give an object up.
    """

    exit_code = 3

    def __init__(self, message: str, *, retryable: bool, code: str | None = None,
                 scope: Scope = "item") -> None:
        super().__init__(message)
        self.retryable = retryable
        self.code = code
        self.scope: Scope = scope


class OutboxBusy(AgentError):
    """Another process holds the outbox drain lock."""

    exit_code = 4


class UsersFileError(AgentError, ValueError):
    """users.json is corrupt or half-written; it is never reset, a person must look."""

    exit_code = 1


class PatientDetailsError(AgentError, ValueError):
    """The patient block of a capture request is malformed; nothing was written."""

    exit_code = 2


class NotUnicodeText(AgentError, ValueError):
    """Text from outside (a patient field, a username, a setting, a file name) that is not
    valid Unicode (a lone surrogate): refused where it is read, before anything is written."""

    exit_code = 2
