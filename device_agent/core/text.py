"""The one gate for text from outside: valid Unicode scalar values, or a refusal.

JSON's `\\ud800` escapes decode to lone surrogates (patient files, users.json), and names
listed from reports/ or values from the environment carry bytes that are not UTF-8 as
surrogates (PEP 383). Python holds them happily; every UTF-8 writer refuses them, which is
how a capture used to be lost after the board was read. Each reader passes what it reads
through `checked` (or `checked_tree`) at the edge, so a refusal comes first, in one line
naming the field, and never mid-write. Text is not otherwise rewritten: no NFC, no
replacement character, since `José` and `Jose\u0301` may be two different users.

Also here: `closest`, the one "did you mean" for unknown keys (settings, patient files).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from device_agent.core.errors import NotUnicodeText

_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_WHY = ("a lone surrogate (a \\ud800-\\udfff escape, or bytes that are not UTF-8) that no "
        "file can hold")


def text_problem(value: str) -> str | None:
    """Why `value` cannot be written as UTF-8 (None when it can)."""
    return _WHY if _SURROGATE_RE.search(value) else None


def checked(value: str, what: str) -> str:
    """`value` itself when it is valid Unicode; NotUnicodeText naming `what` otherwise.

    `what` names the field or file, never the value (it may be a person's name).
    """
    if _SURROGATE_RE.search(value):
        raise NotUnicodeText(f"{what} holds {_WHY}; fix it at its source")
    return value


def checked_tree(value: Any, what: str) -> Any:
    """Every string (keys too) in a parsed JSON value through `checked`; the value unchanged."""
    if isinstance(value, str):
        checked(value, what)
    elif isinstance(value, Mapping):
        for key, item in value.items():  # keys may be usernames: never named in the message
            if isinstance(key, str):
                checked(key, what)
            checked_tree(item, what)
    elif isinstance(value, list | tuple):
        for item in value:
            checked_tree(item, what)
    return value


def closest(name: str, known: Iterable[str], *, cutoff: float = 0.75) -> str | None:
    """The known key a misspelt `name` most likely meant (case-insensitive), or None."""
    by_folded = {k.casefold(): k for k in known}
    match = difflib.get_close_matches(name.casefold(), list(by_folded), n=1, cutoff=cutoff)
    return by_folded[match[0]] if match else None
