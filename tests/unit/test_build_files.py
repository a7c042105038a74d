"""The install pins: constraints.txt is what the tests run with, and the Makefile and CI use it.

A dependency added or upgraded without `make constraints` fails here, so the file never drifts
from the versions the suite actually ran with.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
NOT_PINNED = {"qpki", "pip", "setuptools", "wheel"}


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt pins exact versions only: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_exactly_what_the_tests_run_with() -> None:
    installed = {
        canonicalize_name(dist.metadata["Name"]): dist.version
        for dist in metadata.distributions()
        if dist.metadata["Name"]
    }
    pins = _constraints()
    for name in NOT_PINNED:
        installed.pop(name, None)
    drift = {n: (pins.get(n), v) for n, v in installed.items() if pins.get(n) != v}
    assert not drift, f"constraints.txt is stale (pinned, installed): {drift}; run make constraints"


def test_declared_ranges_admit_the_pinned_versions_and_cap_risky_majors() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        requirements += [Requirement(r) for r in extra]
    pins = _constraints()
    for req in requirements:
        pinned = pins.get(canonicalize_name(req.name))
        assert pinned is not None, f"{req.name} is not in constraints.txt"
        assert req.specifier.contains(pinned, prereleases=True), (str(req), pinned)
    capped = {canonicalize_name(r.name) for r in requirements if "<" in str(r.specifier)}
    # redis-py's timeouts, gunicorn's logger class and Flask's SECRET_KEY_FALLBACKS are relied
    # on explicitly; a new major must be tested before it is allowed.
    assert {"redis", "gunicorn", "flask", "flask-limiter", "sqlalchemy", "psycopg"} <= capped


def test_make_run_installs_only_the_app_and_everything_uses_the_constraints() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^PIP := .*-c constraints\.txt$", makefile, re.M)
    run_install = re.search(r"^\$\(BIN\)/\.installed: .*\n\t\$\(PIP\) (.*)$", makefile, re.M)
    assert run_install and run_install.group(1).strip() == "-e .", "make run installs test extras"
    assert re.search(r"^run: install$", makefile, re.M)
    assert re.search(r"^lint: install-test$", makefile, re.M)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "export QPKI_REQUIRE_ALL=1" in ci and "make test" in ci
