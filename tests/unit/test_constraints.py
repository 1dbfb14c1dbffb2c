"""The environment under test is the one constraints.txt pins: a drifted install fails CI."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest

CONSTRAINTS = Path(__file__).resolve().parents[2] / "constraints.txt"
# What the agent runs on and what proves it: a drift in any of these changes what was tested.
PINNED = ("boto3", "botocore", "urllib3", "s3transfer", "numpy", "pyserial", "reportlab",
          "pydicom", "moto", "pytest", "hypothesis")


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_every_pinned_package_is_constrained() -> None:
    pins = _pins()
    missing = [name for name in PINNED if name not in pins]
    assert not missing, f"constraints.txt lacks {missing}"


@pytest.mark.parametrize("name", PINNED)
def test_installed_version_is_the_constrained_one(name: str) -> None:
    wanted = _pins()[name]
    installed = metadata.version(name)
    assert installed == wanted, (
        f"{name} {installed} is installed but constraints.txt pins {wanted}: "
        "reinstall with 'make clean test', or record a tested upgrade with 'make constraints'"
    )


@pytest.mark.parametrize("name", ("boto3", "botocore", "urllib3"))
def test_pyproject_bounds_what_was_tested(name: str) -> None:
    """The HTTP stack has an upper bound in pyproject, and the pinned version is inside it."""
    import tomllib

    from packaging.requirements import Requirement

    pyproject = CONSTRAINTS.parent / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    (requirement,) = [Requirement(d) for d in deps if Requirement(d).name == name]
    assert any(spec.operator == "<" for spec in requirement.specifier), (
        f"pyproject.toml: {requirement} has no upper bound")
    assert requirement.specifier.contains(_pins()[name]), (
        f"constraints.txt pins {name} {_pins()[name]}, outside pyproject's {requirement}")
