"""First run of the qpki command as a new user meets it: quiet commands, the start-up hint, and
``--password-stdin`` both from a pipe and at a real terminal (a pseudo-terminal)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import PASSWORD
from qpki.cli import first_user_hint, main, qpki_command

QPKI = [sys.executable, "-m", "qpki"]


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {"QPKI_DATA_DIR": str(tmp_path / "data")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("QPKI_DATABASE_URL", "QPKI_MFA_KEY", "QPKI_LOG_LEVEL", "QPKI_LOG_JSON"):
        monkeypatch.delenv(name, raising=False)
    return {**os.environ, **env}


def test_commands_print_only_their_result_unless_verbose(cli_env: dict[str, str]) -> None:
    quiet = subprocess.run(
        [*QPKI, "users", "list"], env=cli_env, capture_output=True, text=True, timeout=120
    )
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.splitlines()[0].split()[:2] == ["ID", "USERNAME"]
    assert quiet.stderr == "", quiet.stderr  # no "key ring loaded", no schema or mail lines
    verbose = subprocess.run(
        [*QPKI, "-v", "users", "list"], env=cli_env, capture_output=True, text=True, timeout=120
    )
    assert verbose.returncode == 0, verbose.stderr
    assert "INFO" in verbose.stderr and "key ring loaded" in verbose.stderr, verbose.stderr


def test_start_up_hint_names_a_command_that_works_in_a_new_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = Path(sys.executable).parent / "qpki"
    assert script.exists(), "the test venv has the qpki script"
    monkeypatch.chdir(tmp_path)  # outside the venv: the absolute path
    assert qpki_command() == os.path.abspath(script)
    monkeypatch.chdir(Path(sys.executable).parent.parent.parent)  # the venv's parent (repo)
    relative = qpki_command()
    assert relative.startswith(".") and relative.endswith("/bin/qpki"), relative
    assert (Path.cwd() / relative).samefile(script)
    hint = first_user_hint()
    assert f"  {relative} users create admin " in hint
    assert "\n  qpki " not in hint  # the bare name is not on PATH in a new terminal


def test_password_from_a_pipe(cli_env: dict[str, str]) -> None:
    result = CliRunner().invoke(
        main, ["users", "create", "piper", "--password-stdin"], input=PASSWORD + "\n"
    )
    assert result.exit_code == 0, result.output
    assert "Created viewer piper" in result.output
    assert PASSWORD not in result.output and "Password" not in result.output  # no prompt


def _talk(fd: int, until: bytes, timeout: float = 60.0) -> bytes:
    """Read from the terminal until ``until`` shows (or the child ends, or time runs out)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while until not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 1024)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    return seen


def _create_at_terminal(env: dict[str, str], first: str, second: str) -> tuple[int, str]:
    """`qpki users create tty --password-stdin` on a pseudo-terminal; a person types twice."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal
        os.execve(sys.executable, [*QPKI, "users", "create", "tty", "--password-stdin"], env)  # noqa: S606
    try:
        out = _talk(fd, b"Password: ")
        assert b"Password: " in out, out
        os.write(fd, first.encode() + b"\n")
        out += _talk(fd, b"Repeat the password: ")
        assert b"Repeat the password: " in out, out
        os.write(fd, second.encode() + b"\n")
        out += _talk(fd, b"\x00never")  # to the end
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def test_password_at_a_terminal_is_asked_twice_without_echo(cli_env: dict[str, str]) -> None:
    code, out = _create_at_terminal(cli_env, PASSWORD, PASSWORD)
    assert code == 0, out
    assert "Created viewer tty" in out
    assert PASSWORD not in out  # the terminal did not echo what was typed

    code, out = _create_at_terminal(cli_env, PASSWORD, PASSWORD + " typo")
    assert code == 1, out
    assert "The passwords differ" in out and PASSWORD not in out
