"""The service files in deploy/: systemd units that systemd accepts, an environment file that
means under systemd's rules what it says, and the documented way to fill in nginx.conf.

The units are checked by systemd's own `systemd-analyze verify` and `security --offline`
where that binary exists (it is optional here: the test skips without it). The environment
file is read with systemd's EnvironmentFile= rules — comments only on their own line; a `#`
after a value is part of the value, which once turned `QPKI_HTTPS=1   # …` into a
non-boolean — and a real `qpki run` is started from exactly the unit's ExecStart line, the
unit's Environment= lines and the file, with nothing inherited from the test's environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from harness.services import PostgresServer, RedisServer, free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNITS = ("qpki.service", "qpki-cleanup.service", "qpki-cleanup.timer")
VENV_QPKI = Path(sys.executable).with_name("qpki")
INSTALLED_QPKI = "/opt/qpki/.venv/bin/qpki"


# -- systemd's EnvironmentFile= rules ------------------------------------------------------------
def parse_environment_file(text: str) -> dict[str, str]:
    """Parse like systemd's EnvironmentFile= (load_env_file in src/basic/env-file.c).

    Lines starting with `#` or `;` (after leading blanks) are comments; a comment is never
    recognised after a value. A line is KEY=VALUE, blanks around KEY and before VALUE are
    dropped; an unquoted value loses trailing blanks and keeps everything else literally,
    except that a backslash escapes the next character and a final backslash continues the
    line. Single quotes keep their content literally; inside double quotes a backslash
    escapes `"`, `\\`, `$` and a backquote.
    """
    env: dict[str, str] = {}
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        stripped = line.lstrip(" \t")
        if not stripped or stripped[0] in "#;":
            continue
        while stripped.endswith("\\") and not stripped.endswith("\\\\") and i < len(lines):
            stripped = stripped[:-1] + lines[i]
            i += 1
        key, sep, raw = stripped.partition("=")
        assert sep, f"not an assignment: {line!r}"
        key = key.strip(" \t")
        raw = raw.lstrip(" \t")
        value = []
        quote: str | None = None
        pos = 0
        trailing_blank_from = None
        while pos < len(raw):
            ch = raw[pos]
            if quote is None:
                if ch in "'\"" and not value:
                    quote = ch
                elif ch == "\\" and pos + 1 < len(raw):
                    pos += 1
                    value.append(raw[pos])
                    trailing_blank_from = None
                else:
                    if ch in " \t":
                        trailing_blank_from = (
                            len(value) if trailing_blank_from is None else trailing_blank_from
                        )
                    else:
                        trailing_blank_from = None
                    value.append(ch)
            elif ch == quote:
                quote = None
            elif quote == '"' and ch == "\\" and pos + 1 < len(raw) and raw[pos + 1] in '"\\$`':
                pos += 1
                value.append(raw[pos])
            else:
                value.append(ch)
            pos += 1
        if trailing_blank_from is not None:
            value = value[:trailing_blank_from]
        env[key] = "".join(value)
    return env


def test_the_parser_keeps_inline_comments_as_systemd_does() -> None:
    """The bug of the old README example, reproduced: systemd keeps `# …` in the value."""
    parsed = parse_environment_file(
        "# a comment\n"
        "  ; another\n"
        "QPKI_HTTPS=1        # served over HTTPS\n"
        "QPKI_DATA_DIR=/var/lib/qpki   \n"
        "QUOTED='a # b'\n"
        'DOUBLE="x \\" y"\n'
        "QPKI_SECRET_KEY=abc   QPKI_MFA_KEY=def\n"
    )
    assert parsed["QPKI_HTTPS"] == "1        # served over HTTPS"
    assert parsed["QPKI_DATA_DIR"] == "/var/lib/qpki"
    assert parsed["QUOTED"] == "a # b" and parsed["DOUBLE"] == 'x " y'
    assert parsed["QPKI_SECRET_KEY"] == "abc   QPKI_MFA_KEY=def"  # the MFA key is lost
    assert "QPKI_MFA_KEY" not in parsed


def test_the_env_file_has_no_inline_comments_quotes_or_keys() -> None:
    text = (DEPLOY / "qpki.env").read_text(encoding="utf-8")
    env = parse_environment_file(text)
    # A shell (`set -a; . qpki.env`, as the guide does for commands run by hand) reads it alike.
    shell = subprocess.run(
        ["bash", "-euc", f"set -a; . {DEPLOY / 'qpki.env'}; env -0"],
        env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    from_shell = dict(
        item.split("=", 1) for item in shell.stdout.split("\0") if item.startswith("QPKI_")
    )
    assert from_shell == env
    for key, value in env.items():
        assert key.startswith("QPKI_"), key
        assert "#" not in value and "'" not in value and '"' not in value, (key, value)
        assert value == value.strip() and value, (key, value)
    assert env["QPKI_HTTPS"] == "1" and env["QPKI_PROXY_FIX"] == "1"
    assert env["QPKI_LOG_JSON"] == "1"
    # Keys come from systemd credentials (LoadCredential=), never from this file.
    assert not {k for k in env if "KEY" in k}, env.keys()


# -- the units -------------------------------------------------------------------------------
def _unit_lines(name: str, directive: str) -> list[str]:
    text = (DEPLOY / name).read_text(encoding="utf-8")
    return re.findall(rf"(?m)^{directive}=(.*)$", text)


def test_units_declare_user_state_directory_credentials_and_hardening() -> None:
    for name in ("qpki.service", "qpki-cleanup.service"):
        assert _unit_lines(name, "User") == ["qpki"]
        assert _unit_lines(name, "StateDirectory") == ["qpki"]
        assert _unit_lines(name, "StateDirectoryMode") == ["0700"]
        assert _unit_lines(name, "EnvironmentFile") == ["/etc/qpki/qpki.env"]
        credentials = {line.split(":", 1)[0] for line in _unit_lines(name, "LoadCredential")}
        assert credentials == {"secret_key", "mfa_key", "audit_key"}
        environment = set(_unit_lines(name, "Environment"))
        for key in ("SECRET_KEY", "MFA_KEY", "AUDIT_KEY"):
            assert f"QPKI_{key}_FILE=%d/{key.lower()}" in environment
        for directive in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "ProtectHome"):
            assert _unit_lines(name, directive), (name, directive)
    assert _unit_lines("qpki-cleanup.service", "ExecStart") == [f"{INSTALLED_QPKI} cleanup"]
    assert _unit_lines("qpki-cleanup.timer", "OnCalendar") == ["daily"]


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd); optional")
    return found


def _units_for_this_machine(tmp_path: Path) -> list[Path]:
    """The units with ExecStart pointing at this checkout's qpki (verify checks it exists)."""
    paths = []
    for name in UNITS:
        text = (DEPLOY / name).read_text(encoding="utf-8").replace(INSTALLED_QPKI, str(VENV_QPKI))
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    assert VENV_QPKI.exists(), VENV_QPKI
    result = subprocess.run(
        [tool, "verify", "--man=no", *map(str, _units_for_this_machine(tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    # Unknown or misspelt directives only warn (exit 0); any output at all is a finding.
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    assert not result.stdout.strip(), result.stdout


def test_the_service_is_rated_well_hardened(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    service = _units_for_this_machine(tmp_path)[0]
    result = subprocess.run(
        [tool, "security", "--offline=yes", "--no-pager", str(service)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    print(f"\nsystemd-analyze security exposure of qpki.service: {exposure}")
    assert exposure <= 2.0, result.stdout  # "OK" starts below 5; 10 is unprotected


# -- the app started exactly as the unit starts it ------------------------------------------------
def _exec_start(env: dict[str, str]) -> list[str]:
    """The unit's ExecStart with ${VAR} expanded from ``env``, as systemd does."""
    (line,) = _unit_lines("qpki.service", "ExecStart")
    words = line.split()
    assert all(not w.startswith("$") or re.fullmatch(r"\$\{\w+\}", w) for w in words), words
    expanded = [env[w[2:-1]] if w.startswith("${") else w for w in words]
    assert expanded[0] == INSTALLED_QPKI
    return [str(VENV_QPKI), *expanded[1:]]


def _http(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        return 0, repr(exc)


def test_the_app_starts_from_the_env_file_and_credentials(
    deploy_postgres: PostgresServer, deploy_redis: RedisServer, tmp_path: Path
) -> None:
    env = parse_environment_file((DEPLOY / "qpki.env").read_text(encoding="utf-8"))
    # What differs on this test machine: the infrastructure's addresses (the same lines an
    # operator edits per deployment) and the per-machine bind address and worker count.
    port = free_port()
    env.update(
        QPKI_DATABASE_URL=deploy_postgres.create_database("from_env_file"),
        QPKI_REDIS_URL=deploy_redis.url,
        QPKI_HOST="127.0.0.1",
        QPKI_PORT=str(port),
        QPKI_WORKERS="2",
    )
    # systemd's side: credentials in $CREDENTIALS_DIRECTORY (%d), state directory (%S/qpki).
    # The keys are made with the guide's own lines (the credentials directory moved here).
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    snippet = re.search(
        r"```sh\n(/opt/qpki/\.venv/bin/qpki keys generate \|.*?)\n```", readme, re.S
    )
    assert snippet, "deploy/README.md shows no `qpki keys generate | while …` block"
    script = snippet.group(1).replace("/etc/qpki/credentials", str(credentials))
    script = script.replace(INSTALLED_QPKI, str(VENV_QPKI))
    subprocess.run(
        ["bash", "-euc", script], check=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "QPKI_DATA_DIR": str(tmp_path / "scratch")},
    )  # fmt: skip
    assert sorted(p.name for p in credentials.iterdir()) == ["audit_key", "mfa_key", "secret_key"]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in credentials.iterdir())
    state = tmp_path / "state" / "qpki"
    unit_env = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        .replace("%d", str(credentials))
        .replace("%S", str(tmp_path / "state"))
        for line in _unit_lines("qpki.service", "Environment")
    }
    full_env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **env, **unit_env}
    assert full_env["QPKI_DATA_DIR"] == str(state)

    migrate = subprocess.run(
        [str(VENV_QPKI), "migrate"], env=full_env, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert migrate.returncode == 0, migrate.stderr

    # The guide's block for commands run by hand, on this machine's paths.
    block = re.search(r"```sh\n(\( set -a; \. /etc/qpki/qpki\.env.*?)\n```", readme, re.S)
    assert block, "deploy/README.md shows no `( set -a; . /etc/qpki/qpki.env …` block"
    env_copy = tmp_path / "qpki.env"
    env_copy.write_text("".join(f"{k}={v}\n" for k, v in env.items()), encoding="utf-8")
    state.mkdir(parents=True, mode=0o700, exist_ok=True)
    script = (
        block.group(1)
        .replace("/etc/qpki/qpki.env", str(env_copy))
        .replace("/etc/qpki/credentials", str(credentials))
        .replace("/var/lib/qpki", str(state))
        .replace("runuser -u qpki -- ", "")  # no such user on the test machine
        .replace(INSTALLED_QPKI, str(VENV_QPKI))
    )
    by_hand = subprocess.run(
        ["bash", "-euc", script], env={"PATH": "/usr/bin:/bin"}, capture_output=True,
        text=True, timeout=120, check=False,
    )  # fmt: skip
    assert by_hand.returncode == 0 and "USERNAME" in by_hand.stdout, by_hand.stderr

    log_path = tmp_path / "service.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            _exec_start(full_env),
            env=full_env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while _http(f"http://127.0.0.1:{port}/readyz")[0] != 200:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        login = urllib.request.urlopen(f"http://127.0.0.1:{port}/auth/login", timeout=5)
        assert "__Host-qpki_session" in (login.headers.get("Set-Cookie") or "")  # HTTPS=1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    for line in log_path.read_text().splitlines():
        assert json.loads(line)["level"], line  # QPKI_LOG_JSON=1 from the file
    assert "QPKI_HTTPS" not in log_path.read_text()  # no complaint about a setting


# -- nginx -----------------------------------------------------------------------------------
def test_the_documented_envsubst_line_fills_in_nginx_conf_as_the_tests_do(tmp_path: Path) -> None:
    if shutil.which("envsubst") is None:
        pytest.skip("envsubst not installed (apt-get install gettext-base); optional")
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```sh\n\s*(export bind=.*?envsubst .*?)\n\s*```", readme, re.S)
    assert block, "deploy/README.md shows no export + envsubst block for nginx.conf"
    script = block.group(1).replace("deploy/nginx.conf", str(DEPLOY / "nginx.conf"))
    script = re.sub(r">\s*/etc/nginx/\S+", f"> {tmp_path / 'nginx.conf'}", script)
    subprocess.run(["bash", "-euc", script], check=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    rendered = (tmp_path / "nginx.conf").read_text(encoding="utf-8")

    values = dict(re.findall(r"(\w+)=(\S*)", block.group(1).split("envsubst")[0]))
    expected = string.Template((DEPLOY / "nginx.conf").read_text(encoding="utf-8"))
    assert rendered == expected.safe_substitute(values)
    for name in values:
        assert f"${name}" not in rendered and f"${{{name}}}" not in rendered
    assert "$remote_addr" in rendered and "$host" in rendered  # nginx's own variables kept
