"""Property suite profiles: CI runs a bounded number of examples, `-m slow` ten times more.

Each property test takes the `size` fixture, parametrised twice: `ci` (runs by default) and
`slow` (marked slow, so it runs only under `-m slow`). `examples(size, n)` turns a test's CI
count into the hypothesis settings of the profile: derandomised (the same examples on every
run, so a CI failure reproduces as it is), no deadline (a shared 2-core machine), no example
database written into the checkout.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings

SLOW_FACTOR = 10
_BASE: dict[str, Any] = dict(
    deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much])
if os.environ.get("PROPS_SHRINK") == "0":  # while developing: report the first failure fast
    _BASE["phases"] = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target]
settings.register_profile("props-ci", **_BASE)
settings.register_profile("props-slow", **_BASE)


def examples(size: str, ci: int) -> settings:
    """Hypothesis settings for `ci` examples under CI, SLOW_FACTOR times that under -m slow."""
    profile = settings.get_profile(f"props-{size}")
    return settings(profile, max_examples=ci * (SLOW_FACTOR if size == "slow" else 1))


@pytest.fixture(params=["ci", pytest.param("slow", marks=pytest.mark.slow)])
def size(request) -> str:
    return str(request.param)
