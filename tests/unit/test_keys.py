"""The MFA key ring (``.mfa_key`` / ``QPKI_MFA_KEY``): SECURITY_CHECKLIST §4.3, §4.6.

A lost or replaced key silently disables 2FA or loses backup codes, so every problem must stop
start-up with a message naming the file; the file is 0600 from the first byte and every write
is atomic.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet, InvalidToken

import qpki.config
from qpki.auth.keys import (
    KEY_FILE_NAME,
    KeyFileError,
    KeyRing,
    TokenSampleError,
    create_key_file,
    generate_keys,
    key_file_path,
    load_key_ring,
    read_key_file,
    write_key_file,
)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def write_with_mode(path: Path, content: bytes, mode: int = 0o600) -> None:
    path.write_bytes(content)
    path.chmod(mode)


def test_key_file_name(tmp_path: Path) -> None:
    assert key_file_path(tmp_path) == tmp_path / ".mfa_key"
    assert KEY_FILE_NAME == ".mfa_key"


def test_created_when_absent_with_mode_0600(tmp_path: Path) -> None:
    ring, keys, source = load_key_ring(tmp_path, None, encrypted_data_exists=False)
    path = tmp_path / ".mfa_key"
    assert source == str(path)
    assert mode_of(path) == 0o600
    assert stat.S_ISREG(os.stat(path).st_mode)
    assert len(keys) == 1
    assert path.read_bytes() == keys[0] + b"\n"
    Fernet(keys[0])  # a valid key
    assert Fernet(keys[0]).decrypt(ring.fernet.encrypt(b"x")) == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mfa_key"]  # no temp leftovers


def test_reused_on_next_start(tmp_path: Path) -> None:
    ring1, keys1, _ = load_key_ring(tmp_path, None, encrypted_data_exists=False)
    token = ring1.fernet.encrypt(b"secret")
    ring2, keys2, _ = load_key_ring(tmp_path, None, encrypted_data_exists=True)
    assert keys2 == keys1
    assert ring2.fernet.decrypt(token) == b"secret"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mfa_key"]


def test_temp_file_is_0600_from_the_first_byte(tmp_path: Path, monkeypatch) -> None:
    """The file is opened O_CREAT|O_EXCL with mode 0600, not chmod-ed after writing."""
    calls: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *args, **kwargs):
        calls.append((str(path), flags, mode))
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(qpki.config.os, "open", spy)
    load_key_ring(tmp_path, None, encrypted_data_exists=False)
    created = [(p, f, m) for p, f, m in calls if f & os.O_CREAT]
    assert created, "the key file was not created through os.open"
    for path, flags, mode in created:
        assert Path(path).parent == tmp_path
        assert flags & os.O_EXCL
        assert mode == 0o600


def test_missing_file_with_encrypted_data_stops(tmp_path: Path) -> None:
    path = tmp_path / ".mfa_key"
    with pytest.raises(KeyFileError) as excinfo:
        load_key_ring(tmp_path, None, encrypted_data_exists=True)
    assert str(path) in str(excinfo.value)
    assert not path.exists()  # no new key that could never decrypt the data
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", [0o400, 0o600, 0o700])
def test_owner_only_modes_are_accepted(tmp_path: Path, mode: int) -> None:
    key = Fernet.generate_key()
    write_with_mode(tmp_path / ".mfa_key", key + b"\n", mode)
    assert load_key_ring(tmp_path, None, encrypted_data_exists=True)[1] == [key]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o610, 0o601])
def test_too_open_mode_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / ".mfa_key"
    write_with_mode(path, Fernet.generate_key() + b"\n", mode)
    with pytest.raises(KeyFileError) as excinfo:
        load_key_ring(tmp_path, None, encrypted_data_exists=True)
    message = str(excinfo.value)
    assert "chmod 600" in message
    assert str(path) in message
    assert mode_of(path) == mode  # not silently "fixed"


@pytest.mark.parametrize(
    "content",
    [
        b"not a key\n",
        b"",
        b"\n\n  \n",
        b"\xff\xfe\x00garbage",  # not UTF-8
        Fernet.generate_key()[:-4] + b"\n",  # truncated key
        Fernet.generate_key() + b"\nnot a key\n",  # one good line, one bad
    ],
)
def test_garbage_content_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / ".mfa_key"
    write_with_mode(path, content)
    with pytest.raises(KeyFileError) as excinfo:
        load_key_ring(tmp_path, None, encrypted_data_exists=False)
    assert str(path) in str(excinfo.value)
    assert path.read_bytes() == content  # never replaced by a fresh key


def test_read_key_file_missing_names_path(tmp_path: Path) -> None:
    path = tmp_path / ".mfa_key"
    with pytest.raises(KeyFileError, match=str(path)):
        read_key_file(path)


def test_env_key_wins_over_file(tmp_path: Path) -> None:
    file_key, env_key = Fernet.generate_key(), Fernet.generate_key()
    write_with_mode(tmp_path / ".mfa_key", file_key + b"\n")
    ring, keys, source = load_key_ring(tmp_path, env_key.decode(), encrypted_data_exists=True)
    assert source == "QPKI_MFA_KEY"
    assert keys == [env_key]
    assert ring.fernet.decrypt(Fernet(env_key).encrypt(b"x")) == b"x"
    with pytest.raises(InvalidToken):
        ring.fernet.decrypt(Fernet(file_key).encrypt(b"x"))


def test_env_key_needs_no_file(tmp_path: Path) -> None:
    env_key = Fernet.generate_key()
    _, keys, source = load_key_ring(tmp_path, env_key.decode(), encrypted_data_exists=True)
    assert (keys, source) == ([env_key], "QPKI_MFA_KEY")
    assert list(tmp_path.iterdir()) == []


def test_bad_env_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="QPKI_MFA_KEY"):
        load_key_ring(tmp_path, "not-a-key", encrypted_data_exists=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("separator", [",", "\n", ", ", "\r\n", " ,\n "])
def test_multiple_env_keys(tmp_path: Path, separator: str) -> None:
    new, old = Fernet.generate_key(), Fernet.generate_key()
    env = f"{new.decode()}{separator}{old.decode()}"
    ring, keys, _ = load_key_ring(tmp_path, env, encrypted_data_exists=True)
    assert keys == [new, old]
    assert ring.fernet.decrypt(Fernet(old).encrypt(b"old row")) == b"old row"
    # The first key is the primary one: new tokens decrypt with it alone.
    assert Fernet(new).decrypt(ring.fernet.encrypt(b"fresh")) == b"fresh"


def test_multiple_keys_in_file(tmp_path: Path) -> None:
    new, old = Fernet.generate_key(), Fernet.generate_key()
    write_with_mode(tmp_path / ".mfa_key", new + b"\n" + old + b"\n")
    ring, keys, _ = load_key_ring(tmp_path, None, encrypted_data_exists=True)
    assert keys == [new, old]
    assert ring.fernet.decrypt(Fernet(old).encrypt(b"old row")) == b"old row"
    assert Fernet(new).decrypt(ring.fernet.encrypt(b"fresh")) == b"fresh"


def test_write_key_file_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / ".mfa_key"
    old = Fernet.generate_key()
    write_with_mode(path, old + b"\n", 0o644)
    inode_before = os.stat(path).st_ino
    new = Fernet.generate_key()
    write_key_file(path, [new, old])
    assert path.read_bytes() == new + b"\n" + old + b"\n"
    assert mode_of(path) == 0o600
    assert os.stat(path).st_ino != inode_before  # renamed over, not rewritten in place
    assert read_key_file(path) == [new, old]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mfa_key"]


def test_write_key_file_failure_keeps_old_file(tmp_path: Path, monkeypatch) -> None:
    """A crash before the rename leaves the old key ring intact and no temp file behind."""
    path = tmp_path / ".mfa_key"
    old = Fernet.generate_key() + b"\n"
    write_with_mode(path, old)

    def boom(*args, **kwargs):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(qpki.config.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        write_key_file(path, [Fernet.generate_key()])
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mfa_key"]


def test_create_key_file_never_overwrites(tmp_path: Path) -> None:
    """Another worker won the race: its key is loaded, not replaced."""
    path = tmp_path / ".mfa_key"
    theirs = Fernet.generate_key()
    write_with_mode(path, theirs + b"\n")
    assert create_key_file(path) == [theirs]
    assert path.read_bytes() == theirs + b"\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mfa_key"]


def test_create_key_file_fresh(tmp_path: Path) -> None:
    path = tmp_path / ".mfa_key"
    keys = create_key_file(path)
    assert read_key_file(path) == keys
    assert mode_of(path) == 0o600


def test_key_ring_reloads_a_rotated_file(tmp_path: Path) -> None:
    """A running server picks up `qpki keys rotate` without a restart (§4.6 workflow)."""
    ring, keys, _ = load_key_ring(tmp_path, None, encrypted_data_exists=False, reload_interval=0.0)
    new = Fernet.generate_key()
    write_key_file(tmp_path / ".mfa_key", [new, *keys])
    assert ring.fernet.decrypt(Fernet(new).encrypt(b"after rotation")) == b"after rotation"
    assert Fernet(new).decrypt(ring.fernet.encrypt(b"fresh")) == b"fresh"  # new primary
    assert ring.keys == [new, *keys]


def test_reload_interval_is_a_constructor_argument(tmp_path: Path) -> None:
    """Within the interval the file is not looked at; with 0 it is looked at every time."""
    old = Fernet.generate_key()
    path = tmp_path / ".mfa_key"
    write_with_mode(path, old + b"\n")
    lazy = KeyRing([old], path, reload_interval=3600.0)
    eager = KeyRing([old], path, reload_interval=0.0)
    new = Fernet.generate_key()
    write_key_file(path, [new, old])
    assert lazy.keys == [old]
    assert eager.keys == [new, old]
    with pytest.raises(ValueError, match="reload_interval"):
        KeyRing([old], path, reload_interval=-1.0)


def test_broken_file_keeps_the_ring_and_logs_one_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ring, keys, _ = load_key_ring(tmp_path, None, encrypted_data_exists=False, reload_interval=0.0)
    path = tmp_path / ".mfa_key"
    path.write_text("garbage\n")
    with caplog.at_level(logging.ERROR, logger="qpki.auth.keys"):
        for _ in range(3):
            assert Fernet(keys[0]).decrypt(ring.fernet.encrypt(b"still")) == b"still"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # each version of the file is judged once, not on every request
    assert str(path) in errors[0].getMessage()


def test_new_key_that_cannot_decrypt_stored_data_is_not_adopted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 10 item 11: a key file replaced while running must not take over silently."""
    old = Fernet.generate_key()
    path = tmp_path / ".mfa_key"
    write_with_mode(path, old + b"\n")
    stored = [Fernet(old).encrypt(b"totp secret").decode()]
    ring = KeyRing([old], path, reload_interval=0.0, token_sample=lambda: stored)

    wrong = Fernet.generate_key()
    write_key_file(path, [wrong])  # a new key alone: cannot read what is stored
    with caplog.at_level(logging.ERROR, logger="qpki.auth.keys"):
        token = ring.fernet.encrypt(b"enrolled meanwhile")
    assert Fernet(old).decrypt(token) == b"enrolled meanwhile"  # still the working key
    assert ring.fernet.decrypt(stored[0].encode()) == b"totp secret"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and str(path) in errors[0] and "cannot decrypt 1" in errors[0]

    write_key_file(path, [wrong, old])  # a proper rotation: the old key stays to decrypt
    assert Fernet(wrong).decrypt(ring.fernet.encrypt(b"x")) == b"x"
    assert ring.keys == [wrong, old]


def test_removing_the_old_key_too_early_is_refused(tmp_path: Path) -> None:
    """Some stored tokens still need the old key: the file without it is not adopted."""
    old, new = Fernet.generate_key(), Fernet.generate_key()
    path = tmp_path / ".mfa_key"
    write_with_mode(path, new + b"\n" + old + b"\n")
    stored = [
        Fernet(new).encrypt(b"a").decode(),
        Fernet(old).encrypt(b"b").decode(),
    ]
    ring = KeyRing([new, old], path, reload_interval=0.0, token_sample=lambda: stored)
    write_key_file(path, [new])
    assert ring.keys == [new, old]
    assert ring.fernet.decrypt(stored[1].encode()) == b"b"


def test_unreadable_sample_defers_the_reload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """If stored tokens cannot be read (database down), the file is checked again later."""
    old, new = Fernet.generate_key(), Fernet.generate_key()
    path = tmp_path / ".mfa_key"
    write_with_mode(path, old + b"\n")
    database_up = False

    def sample() -> list[str]:
        if not database_up:
            raise TokenSampleError("the database could not be read")
        return [Fernet(old).encrypt(b"s").decode()]

    ring = KeyRing([old], path, reload_interval=0.0, token_sample=sample)
    write_key_file(path, [new, old])
    with caplog.at_level(logging.ERROR, logger="qpki.auth.keys"):
        assert ring.keys == [old]
    assert any(str(path) in r.getMessage() for r in caplog.records)
    database_up = True
    assert ring.keys == [new, old]


def test_decrypt_only_keys(tmp_path: Path) -> None:
    """QPKI_MFA_DECRYPT_KEYS: read tokens under those keys, never encrypt with them."""
    primary, extra = Fernet.generate_key(), Fernet.generate_key()
    ring, keys, source = load_key_ring(
        tmp_path, primary.decode(), encrypted_data_exists=True, decrypt_keys=extra.decode()
    )
    assert (keys, source) == ([primary], "QPKI_MFA_KEY")
    assert ring.fernet.decrypt(Fernet(extra).encrypt(b"other instance")) == b"other instance"
    assert Fernet(primary).decrypt(ring.fernet.encrypt(b"mine")) == b"mine"
    with pytest.raises(InvalidToken):
        Fernet(extra).decrypt(ring.fernet.encrypt(b"mine"))


def test_decrypt_only_keys_survive_a_file_reload(tmp_path: Path) -> None:
    extra = Fernet.generate_key()
    ring, keys, _ = load_key_ring(
        tmp_path,
        None,
        encrypted_data_exists=False,
        decrypt_keys=extra.decode(),
        reload_interval=0.0,
    )
    write_key_file(tmp_path / ".mfa_key", [Fernet.generate_key(), *keys])
    assert ring.fernet.decrypt(Fernet(extra).encrypt(b"x")) == b"x"


def test_bad_decrypt_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="QPKI_MFA_DECRYPT_KEYS"):
        load_key_ring(
            tmp_path,
            Fernet.generate_key().decode(),
            encrypted_data_exists=False,
            decrypt_keys="not-a-key",
        )


def test_generate_keys() -> None:
    """`qpki keys generate`: one usable key of each kind, new every time."""
    first, second = generate_keys(), generate_keys()
    assert list(first) == ["QPKI_SECRET_KEY", "QPKI_MFA_KEY", "QPKI_AUDIT_KEY"]
    Fernet(first["QPKI_MFA_KEY"].encode())
    assert len(first["QPKI_SECRET_KEY"].encode()) >= 32
    audit = base64.urlsafe_b64decode(first["QPKI_AUDIT_KEY"] + "=")
    assert len(audit) == 32
    for value in first.values():
        assert re.fullmatch(r"[A-Za-z0-9_=-]+", value)  # safe unquoted in env files
    assert all(first[name] != second[name] for name in first)
