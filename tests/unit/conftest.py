"""Shared helpers for the pure unit tests (no database, no network, no Flask app).

``tests/`` is put on ``sys.path`` so that ``harness.services.require_component`` can be
imported: the unit tests skip (or fail under ``QPKI_REQUIRE_ALL=1``) when an external
cross-check program such as ``oathtool`` or ``zbarimg`` is not installed.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet, MultiFernet

_TESTS_DIR = str(Path(__file__).resolve().parent.parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


def _require_program(name: str, package: str) -> str:
    """The absolute path of ``name``, or skip/fail through ``require_component``."""
    path = shutil.which(name)
    if path is None:
        from harness.services import require_component

        require_component(name, f"`{name}` is not on PATH (Debian package {package})")
    assert path is not None  # require_component never returns
    return path


@pytest.fixture(scope="session")
def oathtool() -> str:
    """Path of OATH Toolkit's ``oathtool``, an independent TOTP implementation."""
    return _require_program("oathtool", "oathtool")


@pytest.fixture(scope="session")
def zbarimg() -> str:
    """Path of ``zbarimg`` (zbar-tools), an independent QR decoder."""
    return _require_program("zbarimg", "zbar-tools")


@pytest.fixture
def fernet_key() -> bytes:
    return Fernet.generate_key()


@pytest.fixture
def mfa(fernet_key: bytes):
    """An MFAManager with a one-key ring, the way the app builds it."""
    from qpki.auth.mfa import MFAManager

    return MFAManager(MultiFernet([Fernet(fernet_key)]))
