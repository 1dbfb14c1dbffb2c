"""Hostile values for every input the unit reads from outside (all synthetic)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from hypothesis import strategies as st

# Pieces that broke, or could break, something somewhere: path climbing, separators,
# controls, bidi and zero-width marks, NFKD-folding letters and digits (ﬁ, Ⅻ, ², ١),
# scripts that fold to nothing, astral characters, shell and format syntax, lone
# surrogates (as a JSON escape decodes them), names that clean alike.
PIECES = ["José", "Jose\u0301", "JOSÉ", "a/b", "a_b", "a b", "../..", "..", ".", "\\", "\n",
          "\r\n", "\t", "\x00", "\x1b[31m", "\x7f", "\u202e", "\ufeff", "\u200b", "ﬁ", "Ⅻ",
          "²", "١٢٣", "李小龍", "Ωμέγα", "𝕏", "🙂", "%2F", "%00", "'", '"', "${HOME}",
          "$(id)", "`id`", "<b>", "%s%n", "{0}", "x" * 70, " ", "", "\ud800", "\udcff",
          "-0123456789ab", "NULL", "-", "_", "20260124_121815"]
LONE_SURROGATES = ("\ud800", "\udbff", "\udc00", "\udcff", "\udfff")

# A distinctive, synthetic token: a generated identity always carries one, so it can be
# searched for in logs whatever else the value holds (ASCII letters survive every encoding).
canary = st.builds(lambda a, b: f"Qz{a}{b}",
                   st.text("bcdfghjkmnpqrstvwxz", min_size=4, max_size=6),
                   st.integers(10, 99))

hostile_text = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=6)),
                        max_size=4).map("".join)


def identity(min_canary: bool = True) -> st.SearchStrategy[str]:
    """A person's name-like value: hostile pieces around a canary (or hostile text alone)."""
    around = st.tuples(hostile_text, canary, hostile_text).map("".join)
    return around if min_canary else st.one_of(around, hostile_text)


def has_surrogate(value: Any) -> bool:
    return isinstance(value, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in value)


scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30),
                    st.floats(allow_nan=False, allow_infinity=False), hostile_text)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(hostile_text, inner, max_size=3)),
    max_leaves=6)

# Dates as the legacy app and others wrote them, and ones that are not dates.
real_dates = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31))
date_texts = st.one_of(
    real_dates.map(lambda d: d.strftime("%Y-%m-%d %H:%M:%S")),
    real_dates.map(lambda d: d.strftime("%Y-%m-%d")),
    real_dates.map(lambda d: d.isoformat()),
    real_dates.map(lambda d: d.strftime("%Y-%m-%dT%H:%M:%S+05:30")),
    st.sampled_from(["", "yesterday-ish", "0999-01-01", "0001-01-01 00:00:00",
                     "2026-02-30", "2026-13-01", "9999-12-31 23:59:59", "1999-12-31",
                     "2026-01-24 25:61:61", " 2026-01-24 ", "2026-01-24\n", "٢٠٢٦-٠١-٢٤",
                     "2026-01-24 12:04:19\ud800"]),
    st.integers(-10**20, 10**20), st.none(), hostile_text)


def to_json(value: Any) -> str:
    """JSON as a writer would store it: ASCII escapes, so lone surrogates survive."""
    return json.dumps(value, ensure_ascii=True)
