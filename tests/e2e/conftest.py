"""Real-browser fixtures: one app server, one Chromium, seeded users, checked screenshots.

The app runs as a real subprocess (``python -m qpki run`` through ``harness.services``) on a
fresh data directory; Debian's Chromium is driven by Playwright (no browser download). Every
page a journey visits goes through :meth:`Journey.step`, which runs the accessibility checks
(labels, code-input attributes, heading order, no horizontal scrolling at 375 px, and axe-core's
rules with zero violations at both 1280 and 375 px) and writes a screenshot to
``test-artifacts/screenshots/<journey>/<NN-step>.png`` under the repository root.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyotp
import pytest

from harness.services import (
    LOOPBACK,
    AppServer,
    app_server,
    free_port,
    make_self_signed_cert,
    nginx_proxy,
    require_component,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
# axe-core from the npm registry, pinned by tests/e2e/axe/package-lock.json (`npm ci` there;
# .ci/run and `make test` do it).
AXE_JS = Path(__file__).resolve().parent / "axe" / "node_modules" / "axe-core" / "axe.min.js"
SCREENSHOT_ROOT = REPO_ROOT / "test-artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 375, "height": 800}
PHONE_WIDTH = PHONE["width"]

ADMIN_NAME = "admin"
ADMIN_PASSWORD = "correct horse admin staple"
USER_PASSWORD = "a long enough passphrase"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item, so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


# -- tools -----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def browser_tools() -> None:
    """Chromium, zbarimg and oathtool must exist (skip locally, fail under QPKI_REQUIRE_ALL=1)."""
    if not Path(CHROMIUM).exists():
        require_component("chromium", f"{CHROMIUM} not found (apt-get install chromium)")
    if shutil.which("zbarimg") is None:
        require_component("zbarimg", "zbarimg not found (apt-get install zbar-tools)")
    if shutil.which("oathtool") is None:
        require_component("oathtool", "oathtool not found (apt-get install oathtool)")
    if not AXE_JS.exists():
        require_component("axe-core", f"{AXE_JS} not found (cd tests/e2e/axe && npm ci)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        require_component("playwright", "the playwright package is not installed")


# -- the app ---------------------------------------------------------------------------------------
@dataclass
class SeededUser:
    id: int
    username: str
    password: str
    secret: str | None = None
    codes: list[str] = field(default_factory=list)


@dataclass
class LiveApp:
    """The running server plus an in-process app on the same data directory (for seeding)."""

    server: AppServer
    env: dict[str, str]
    data_dir: Path
    flask_app: Any
    admin_name: str = ADMIN_NAME
    admin_password: str = ADMIN_PASSWORD
    admin_secret: str = ""
    public_url: str | None = None  # the proxy's https:// address, when behind nginx
    plain_http_url: str | None = None  # the proxy's http:// port that redirects to https

    @property
    def url(self) -> str:
        return self.public_url or self.server.url

    @property
    def db_path(self) -> Path:
        return self.data_dir / "qpki.db"

    def create_user(self, username: str, *, mfa: bool = False, role: str = "viewer") -> SeededUser:
        """A user made directly through AuthManager; with ``mfa`` 2FA is already enabled.

        Enabling consumes the current TOTP step (the replay guard), so log such a user in with
        the code of the next time step.
        """
        manager = self.flask_app.auth_manager
        user = manager.create_user(username, USER_PASSWORD, f"{username}@example.org", role)
        seeded = SeededUser(user.id, username, USER_PASSWORD)
        if mfa:
            setup = manager.start_mfa_setup(user.id)
            seeded.secret = setup.secret
            seeded.codes = manager.confirm_mfa_setup(user.id, pyotp.TOTP(setup.secret).now())
        return seeded

    def admin_code(self) -> str:
        """A code the administrator's app shows now, let through the replay guard.

        Journeys sign the administrator in several times within one 30-second step; a real
        person would wait for the next code. Forgetting the last step stands in for that wait.
        """
        with sqlite3.connect(self.db_path, timeout=10) as conn:
            conn.execute(
                "UPDATE users SET totp_last_step = NULL WHERE username_key = ?", (ADMIN_NAME,)
            )
        return pyotp.TOTP(self.admin_secret).now()

    def expire_setup_session(self, user_id: int) -> int:
        """Move the user's pending setup's deadline into the past; returns rows changed."""
        past = (datetime.now(UTC) - timedelta(minutes=1)).replace(tzinfo=None)
        with sqlite3.connect(self.db_path, timeout=10) as conn:
            cur = conn.execute(
                "UPDATE mfa_setup_sessions SET expires_at = ? WHERE user_id = ?",
                (past.strftime("%Y-%m-%d %H:%M:%S.%f"), user_id),
            )
            return cur.rowcount

    def log_tail(self, lines: int = 40) -> str:
        """The app's own log lines (access-log lines left out)."""
        own = [
            line
            for line in self.server.log_text().splitlines()
            if not re.search(r'"(GET|POST|HEAD) \S+ HTTP/', line)
        ]
        return "\n".join(own[-lines:])


# Settings the journeys' servers never take from the environment of the test run.
ISOLATED_ENV = {
    "QPKI_DATABASE_URL": "",  # SQLite in the data directory
    "QPKI_REDIS_URL": "",
    "QPKI_SECRET_KEY": "",  # generated into the data directory
    "QPKI_MFA_KEY": "",  # the key file in the data directory
    "QPKI_HTTPS": "0",
    "QPKI_PROXY_FIX": "0",
    "QPKI_ISSUER": "qPKI",
    # Per-address rate limits off so the journeys never trip over each other; the
    # per-account back-off, which journey 4 shows, is always on.
    "QPKI_RATE_LIMITS": "0",
}


@contextmanager
def running_app(base: Path, **settings: str) -> Iterator[LiveApp]:
    """`python -m qpki run` on 127.0.0.1 with a fresh SQLite data dir and an admin account."""
    data_dir = base / "data"
    env = {**ISOLATED_ENV, "QPKI_DATA_DIR": str(data_dir), **settings}
    with app_server(env, log_dir=base / "logs") as server:
        created = subprocess.run(
            [
                *(sys.executable, "-m", "qpki", "users", "create", ADMIN_NAME),
                *("--email", "admin@example.org", "--role", "admin", "--password-stdin"),
            ],
            input=ADMIN_PASSWORD + "\n",
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert created.returncode == 0, created.stderr

        from qpki.app import create_app
        from qpki.config import Settings

        flask_app = create_app(Settings.from_env(env))
        # An administrator acts on other accounts only with 2FA of their own.
        manager = flask_app.auth_manager  # type: ignore[attr-defined]
        admin = manager.get_user(username=ADMIN_NAME)
        setup = manager.start_mfa_setup(admin.id)
        manager.confirm_mfa_setup(admin.id, pyotp.TOTP(setup.secret).now())
        try:
            yield LiveApp(server, env, data_dir, flask_app, admin_secret=setup.secret)
        finally:
            flask_app.db_manager.dispose()


@pytest.fixture(scope="session")
def live_app(browser_tools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    """The app of journeys 1-4, served directly over HTTP."""
    with running_app(tmp_path_factory.mktemp("e2e")) as live:
        yield live


@pytest.fixture(scope="module")
def tls_app(browser_tools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    """The app behind Debian's nginx with TLS, run with the documented deploy/nginx.conf."""
    if shutil.which("nginx") is None:
        require_component("nginx", "nginx not found on PATH (apt-get install nginx)")
    base = tmp_path_factory.mktemp("e2e-tls")
    cert, key = make_self_signed_cert(base / "tls")
    with running_app(
        base, QPKI_HTTPS="1", QPKI_PROXY_FIX="1", QPKI_WEBAUTHN_RP_ID="localhost"
    ) as live:
        upstream = f"{LOOPBACK}:{live.server.port}"
        http_port = free_port()
        with nginx_proxy(
            REPO_ROOT / "deploy" / "nginx.conf",
            bind=LOOPBACK,
            http_port=http_port,
            server_names="localhost 127.0.0.1",
            cert=cert,
            key=key,
            upstream_a=upstream,
            upstream_b=upstream,
        ) as proxy:
            live.public_url = proxy.url
            live.plain_http_url = f"http://{LOOPBACK}:{http_port}"
            yield live


# -- the browser -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def browser(browser_tools: None) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


# -- accessibility ---------------------------------------------------------------------------------
_A11Y_JS = r"""
() => {
  const problems = [];
  const shown = (el) => {
    const style = getComputedStyle(el);
    if (style.display === 'none' || style.visibility === 'hidden') return false;
    return el.getClientRects().length > 0;
  };
  const textOf = (id) => {
    const node = id && document.getElementById(id);
    return node ? node.textContent.trim() : '';
  };
  const describe = (el) =>
    el.id ? `#${el.id}` : (el.name ? `[name=${el.name}]` : el.outerHTML.slice(0, 80));

  if (!document.documentElement.lang) problems.push('<html> has no lang attribute');
  if (!document.title.trim()) problems.push('the page has no <title>');

  // The hidden attribute must hide: an author rule such as `input { display: block }` beats
  // the browser's `[hidden] { display: none }` unless the stylesheet restores it.
  for (const el of document.querySelectorAll('[hidden]')) {
    if (shown(el)) problems.push(`${describe(el)} has the hidden attribute but is displayed`);
  }

  const skipTypes = new Set(['hidden', 'submit', 'button', 'reset', 'image']);
  for (const el of document.querySelectorAll('input, select, textarea')) {
    const type = (el.getAttribute('type') || 'text').toLowerCase();
    if (el.tagName === 'INPUT' && skipTypes.has(type)) continue;
    if (!shown(el) || el.hasAttribute('hidden')) continue;  // the latter reported above
    const byLabel = Array.from(el.labels || []).some((l) => l.textContent.trim());
    const byAria = (el.getAttribute('aria-label') || '').trim() ||
      (el.getAttribute('aria-labelledby') || '').split(/\s+/).some((id) => textOf(id));
    if (!byLabel && !byAria) problems.push(`${describe(el)} has no label`);
    if (el.name === 'code') {
      const autocomplete = el.getAttribute('autocomplete');
      if (autocomplete !== 'one-time-code')
        problems.push(`${describe(el)}: autocomplete is ${autocomplete}, not one-time-code`);
      if (!el.hasAttribute('inputmode')) problems.push(`${describe(el)} has no inputmode`);
    }
  }

  for (const el of document.querySelectorAll('button, a[href], [role=button]')) {
    if (!shown(el)) continue;
    const name = (el.textContent || '').trim() || (el.getAttribute('aria-label') || '').trim() ||
      (el.getAttribute('aria-labelledby') || '').split(/\s+/).some((id) => textOf(id)) ||
      Array.from(el.querySelectorAll('img[alt]')).some((img) => img.alt.trim());
    if (!name) problems.push(`${el.tagName.toLowerCase()} ${describe(el)} has no accessible name`);
  }
  for (const img of document.querySelectorAll('img')) {
    if (!img.hasAttribute('alt')) problems.push(`img ${describe(img)} has no alt attribute`);
  }

  const seen = new Map();
  for (const el of document.querySelectorAll('[id]')) seen.set(el.id, (seen.get(el.id) || 0) + 1);
  for (const [id, n] of seen) if (n > 1) problems.push(`id "${id}" is used ${n} times`);

  const headings = Array.from(document.querySelectorAll('h1, h2, h3, h4, h5, h6'))
    .map((h) => [Number(h.tagName[1]), h.textContent.trim().replace(/\s+/g, ' ')]);
  const h1s = headings.filter(([level]) => level === 1).length;
  if (h1s !== 1) problems.push(`${h1s} <h1> elements (want exactly one)`);
  if (headings.length && headings[0][0] !== 1)
    problems.push(`the first heading is h${headings[0][0]}, not h1`);
  for (let i = 1; i < headings.length; i++) {
    const [prev, prevText] = headings[i - 1];
    const [level, text] = headings[i];
    if (level > prev + 1)
      problems.push(`heading level skipped: h${prev} "${prevText}" then h${level} "${text}"`);
  }
  return problems;
}
"""

_SCROLL_WIDTH_JS = "() => document.documentElement.scrollWidth"

# Every violation axe-core finds with its default rules (WCAG 2.x A and AA, best practices).
_AXE_RUN_JS = """async () => {
  const result = await axe.run(document, { resultTypes: ['violations'] });
  return result.violations.map((v) => ({
    id: v.id, impact: v.impact || '', help: v.help,
    targets: v.nodes.slice(0, 5).map((n) => n.target.join(' ')),
  }));
}"""


@functools.cache
def _axe_source() -> str:
    return AXE_JS.read_text(encoding="utf-8")


def axe_violations(page: Any) -> list[str]:
    """axe-core's violations on the page as it is now, one line each (rule, impact, where).

    The script goes in through page.evaluate (the DevTools protocol), which the app's CSP does
    not apply to: the pages are checked with their real CSP, no inline script is allowed in.
    """
    if not page.evaluate("() => typeof window.axe === 'object'"):
        page.evaluate(_axe_source())
    return [
        f"axe {v['id']} ({v['impact']}): {v['help']} [{', '.join(v['targets'])}]"
        for v in page.evaluate(_AXE_RUN_JS)
    ]


def _layout_problems(page: Any, width: int) -> list[str]:
    """At the current viewport width: sideways scrolling and axe-core's violations."""
    problems = []
    scroll = page.evaluate(_SCROLL_WIDTH_JS)
    if scroll > width:
        problems.append(f"horizontal scrolling at {width} px: scrollWidth {scroll}")
    problems += [f"at {width} px: {v}" for v in axe_violations(page)]
    return problems


def accessibility_problems(page: Any) -> list[str]:
    """What the checks find on the current page (empty when it passes): the basic checks,
    then, at both 1280 and 375 px (the page's own width first), no sideways scrolling and no
    axe-core violation."""
    problems: list[str] = list(page.evaluate(_A11Y_JS))
    viewport = page.viewport_size or DESKTOP
    problems += _layout_problems(page, viewport["width"])
    other = PHONE if viewport["width"] > PHONE_WIDTH else DESKTOP
    page.set_viewport_size(other)
    try:
        problems += _layout_problems(page, other["width"])
    finally:
        page.set_viewport_size(viewport)
    return problems


# -- journeys --------------------------------------------------------------------------------------
class Journey:
    """Screenshots (numbered, one folder per journey) and checks for each step of a journey."""

    def __init__(self, name: str, live: LiveApp, browser: Any) -> None:
        self.name = name
        self.live = live
        self.browser = browser
        self.dir = SCREENSHOT_ROOT / name
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.count = 0
        self.contexts: list[Any] = []
        self.pages: list[Any] = []
        self.page_errors: list[str] = []
        self.problems: list[str] = []
        self.finished = False

    def new_page(self, viewport: dict[str, int] = DESKTOP, **options: Any) -> Any:
        """A page in a fresh browser context (its own cookies: one person, one browser)."""
        context = self.browser.new_context(
            **{
                "viewport": viewport,
                "base_url": self.live.url,
                "accept_downloads": True,
                "locale": "en-GB",
                "timezone_id": "UTC",
                "color_scheme": "light",
                **options,
            }
        )
        context.set_default_timeout(15_000)
        page = context.new_page()
        page.on("pageerror", lambda exc: self.page_errors.append(f"{page.url}: {exc}"))
        page.on("console", lambda msg: self._console(page, msg))
        self.contexts.append(context)
        self.pages.append(page)
        return page

    def _console(self, page: Any, msg: Any) -> None:
        """Record console errors; a page's own 4xx status (a form error, 429) is expected."""
        if msg.type != "error":
            return
        own_status = msg.text.startswith("Failed to load resource: the server responded") and (
            (msg.location or {}).get("url") == page.url
        )
        if not own_status:
            self.page_errors.append(f"{page.url}: console error: {msg.text}")

    def path(self, label: str, suffix: str = ".png") -> Path:
        self.count += 1
        return self.dir / f"{self.count:02d}-{label}{suffix}"

    def step(self, page: Any, label: str) -> None:
        """Check the page (accessibility, 375 px) and write its screenshot.

        Problems are collected, not raised, so one layout bug does not hide the rest of the
        journey; :meth:`finish` reports them all.
        """
        page.wait_for_load_state("load")
        problems = accessibility_problems(page)
        shot = self.path(label)
        page.screenshot(path=shot, full_page=True)
        path = page.url.split("://", 1)[-1].split("/", 1)[-1]
        self.problems.extend(f"/{path} ({shot.name}): {problem}" for problem in problems)

    def check(self, page: Any, ok: bool, problem: str) -> None:
        """A product check that should not stop the journey; reported by :meth:`finish`."""
        if not ok:
            path = page.url.split("://", 1)[-1].split("/", 1)[-1]
            self.problems.append(f"/{path}: {problem}")

    def report(self) -> str:
        lines = []
        if self.problems:
            lines += ["problems found on the pages:", *(f"  {p}" for p in self.problems)]
        if self.page_errors:
            lines += ["script or console errors:", *(f"  {e}" for e in self.page_errors)]
        return "\n".join(lines)

    def finish(self) -> None:
        """The end of a journey: every page visited passed the checks."""
        self.finished = True
        if self.problems or self.page_errors:
            pytest.fail(f"{self.name}:\n{self.report()}", pytrace=False)

    def close(self, failed: bool) -> None:
        broken = failed and not self.finished  # the flow itself broke: keep the last pages
        for index, page in enumerate(self.pages):
            if broken and not page.is_closed():
                try:
                    page.screenshot(path=self.dir / f"FAILED-page{index + 1}.png", full_page=True)
                except Exception as exc:  # the page may be in any state after a failure
                    print(f"could not take the failure screenshot: {exc}")
        for context in self.contexts:
            context.close()


@pytest.fixture
def journey(request: pytest.FixtureRequest, browser: Any) -> Iterator[Callable[..., Journey]]:
    """Factory: ``journey("journey1-new-user", live_app)`` → a :class:`Journey`, closed after."""
    made: list[Journey] = []

    def factory(name: str, live: LiveApp) -> Journey:
        j = Journey(name, live, browser)
        made.append(j)
        return j

    yield factory
    report = getattr(request.node, "rep_call", None)
    failed = report is None or report.failed
    for j in made:
        j.close(failed)
        if failed and not j.finished:
            if j.report():
                print(f"--- {j.name}: checks so far ---\n{j.report()}")
            print("--- app log tail ---\n" + j.live.log_tail())


@pytest.fixture
def a11y_check() -> Callable[[Any], list[str]]:
    """The page checks of :meth:`Journey.step`, for testing the checks themselves."""
    return accessibility_problems
