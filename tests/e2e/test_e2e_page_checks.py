"""The page checks that every journey step runs must catch what they claim to catch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

GOOD = """<!doctype html><html lang="en"><head><title>Good</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>input { display: block; width: 100%; } [hidden] { display: none !important; }</style>
</head><body><main>
<h1>Sign in</h1>
<form><input type="hidden" name="csrf_token" value="x">
<input type="text" name="username" value="u" autocomplete="username" hidden>
<label for="code">Code</label>
<input id="code" name="code" autocomplete="one-time-code" inputmode="numeric">
<label>Remember <input type="checkbox" name="remember"></label>
<input type="search" aria-label="Search">
<button type="submit">Verify</button></form>
<section><h2>Help</h2><h3>Lost phone</h3></section><h2>More</h2>
</main></body></html>"""

BAD = """<!doctype html><html><head><title>Bad</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>input { display: block; }</style>
</head><body>
<h1>One</h1><h3>Skipped a level</h3><h1>Two</h1>
<input type="text" name="username" value="u" hidden>
<input id="orphan" type="text">
<input id="code" name="code" autocomplete="off">
<button type="button"></button>
<img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=">
<span id="twice"></span><span id="twice"></span>
<div style="width: 600px">wide</div>
</body></html>"""


@pytest.fixture
def blank_page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        yield context.new_page()
    finally:
        context.close()


def test_a_good_page_passes(blank_page: Any, a11y_check: Callable[[Any], list[str]]) -> None:
    blank_page.set_content(GOOD)
    assert a11y_check(blank_page) == []


def test_a_bad_page_fails_on_each_rule(
    blank_page: Any, a11y_check: Callable[[Any], list[str]]
) -> None:
    blank_page.set_content(BAD)
    found = "\n".join(a11y_check(blank_page))
    expected = [
        "<html> has no lang attribute",
        "[name=username] has the hidden attribute but is displayed",
        "#orphan has no label",
        "#code: autocomplete is off, not one-time-code",
        "#code has no inputmode",
        "has no accessible name",
        "has no alt attribute",
        'id "twice" is used 2 times',
        "2 <h1> elements",
        'heading level skipped: h1 "One" then h3 "Skipped a level"',
        "horizontal scrolling at 375 px",
        # axe-core, at both widths
        "at 1280 px: axe image-alt (critical)",
        "at 375 px: axe image-alt (critical)",
        "at 1280 px: axe label (critical)",
        "at 1280 px: axe html-has-lang (serious)",
    ]
    missing = [e for e in expected if e not in found]
    assert not missing, f"not reported: {missing}\nreported:\n{found}"
    assert blank_page.viewport_size == {"width": 1280, "height": 800}  # restored
