"""The API's views are imported by their first request (qpki.api.lazy), and nothing changes.

The app is built in a fresh interpreter the way ``qpki run`` builds it (the views, spectree
and pydantic are process-wide once imported, so a test in this process could not see the
before), then served through the test client: error answers, health and /metrics before any
view is loaded, then a worker's first API calls — the per-key limit counts from the very
first, the schema is checked — and the OpenAPI document covers every rule.
"""

from __future__ import annotations

import inspect

import pytest
from flask import Flask
from flask_limiter.util import get_qualified_name

from helpers import run_fresh_app_process
from qpki.api.lazy import LazyView, load_views
from qpki.api.routes import RULES, VIEWS_MODULE

DEFERRED = ("pydantic", "spectree", "qpki.api.views", "qpki.api.openapi", "qpki.api.schemas")

_SERVE_LIKE_A_WORKER = """
import json, sys
from qpki.api import api_keys_of
from qpki.api.metrics_dir import prepare_multiprocess_dir
from qpki.config import Settings
from qpki.cli import _app

DEFERRED = tuple(sys.argv[1].split(","))


def loaded():
    return sorted(m for m in sys.modules if m.startswith(DEFERRED))


prepare_multiprocess_dir(Settings.from_env().data_dir)
app = _app(migrate=True, quiet=True)
client = app.test_client()
report = {"at_start": loaded()}


def answer(response):
    return {
        "status": response.status_code,
        "mimetype": response.mimetype,
        "type": (response.get_json(silent=True) or {}).get("type"),
        "errors": (response.get_json(silent=True) or {}).get("errors"),
        "limit": response.headers.get("X-RateLimit-Limit"),
        "remaining": response.headers.get("X-RateLimit-Remaining"),
    }


report["before"] = {
    "healthz": answer(client.get("/healthz")),
    "not_found": answer(client.get("/api/v1/no-such-operation")),
    "wrong_method": answer(client.delete("/api/v1/verify")),
    "metrics_without_key": answer(client.get("/metrics")),
}
report["after_errors"] = loaded()
keys = api_keys_of(app)
first = keys.create("first", ["verify"], expires_days=None, actor_name="test").secret
second = keys.create("second", ["verify"], expires_days=None, actor_name="test").secret


def verify(secret, body):
    return answer(
        client.post("/api/v1/verify", json=body, headers={"Authorization": f"Bearer {secret}"})
    )


report["first_call"] = verify(first, {"username": "nobody", "code": "123456"})
report["after_first_call"] = loaded()
report["second_call"] = verify(first, {"username": "nobody"})
report["other_key"] = verify(second, {"username": "nobody", "code": "123456"})
report["after"] = {
    "not_found": answer(client.get("/api/v1/no-such-operation")),
    "healthz": answer(client.get("/healthz")),
}
doc = client.get("/api/v1/openapi.json").get_json()
report["operations"] = sorted(
    [method.upper(), path] for path, ops in doc["paths"].items() for method in ops
)
report["docs_page"] = client.get("/api/v1/docs").status_code
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def worker_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    report: dict[str, object] = run_fresh_app_process(
        _SERVE_LIKE_A_WORKER,
        ",".join(DEFERRED),
        data_dir=tmp_path_factory.mktemp("data"),
        QPKI_RATE_LIMITS="1",
    )
    return report


def _problem(answer: object, status: int, slug: str) -> None:
    assert isinstance(answer, dict)
    assert answer["status"] == status, answer
    assert answer["mimetype"] == "application/problem+json", answer
    assert answer["type"] == f"urn:qpki:problem:{slug}", answer


def test_error_answers_health_and_metrics_need_no_view_loaded(
    worker_report: dict[str, object],
) -> None:
    assert worker_report["at_start"] == []
    before = worker_report["before"]
    assert isinstance(before, dict)
    assert before["healthz"]["status"] == 200
    _problem(before["not_found"], 404, "not-found")
    _problem(before["wrong_method"], 405, "method-not-allowed")
    _problem(before["metrics_without_key"], 401, "unauthorized")
    assert worker_report["after_errors"] == []


def test_a_workers_first_api_call_loads_the_views_and_is_limited_per_key(
    worker_report: dict[str, object],
) -> None:
    first = worker_report["first_call"]
    assert isinstance(first, dict)
    assert first["status"] == 200 and first["mimetype"] == "application/json"
    # The per-key limit counted the very call that imported the view ...
    assert (first["limit"], first["remaining"]) == ("600", "599")
    loaded = worker_report["after_first_call"]
    assert isinstance(loaded, list)
    assert {"pydantic", "spectree", "qpki.api.views", "qpki.api.schemas"} <= set(loaded)
    # ... and the next one, whose body spectree refuses, on the same key's counter.
    second = worker_report["second_call"]
    _problem(second, 400, "invalid-request")
    assert isinstance(second, dict)
    assert second["remaining"] == "598"
    assert second["errors"] == [{"loc": ["code"], "msg": "Field required"}]
    other = worker_report["other_key"]
    assert isinstance(other, dict)
    assert (other["status"], other["remaining"]) == (200, "599")
    after = worker_report["after"]
    assert isinstance(after, dict)
    _problem(after["not_found"], 404, "not-found")
    assert after["healthz"]["status"] == 200


def test_the_document_built_in_a_fresh_worker_covers_every_rule(
    worker_report: dict[str, object],
) -> None:
    documented = {tuple(op) for op in worker_report["operations"]}  # type: ignore[attr-defined]
    expected = {
        (method, "/api/v1" + rule.replace("<int(min=1):user_id>", "{user_id}"))
        for rule, method, name in RULES
        if name not in ("openapi_json", "reference")
    }
    assert documented == expected
    assert worker_report["docs_page"] == 200


def test_every_rule_stands_for_a_view_under_the_name_the_limiter_keys_it_by(
    api_app: Flask,
) -> None:
    load_views(api_app)
    for _rule, _method, name in RULES:
        stand_in = api_app.view_functions[f"api.{name}"]
        assert isinstance(stand_in, LazyView) and stand_in.loaded
        view = stand_in.load()
        assert view.__module__ == VIEWS_MODULE and view.__name__ == name
        assert get_qualified_name(stand_in) == get_qualified_name(view)
        assert stand_in.__wrapped__ is view and stand_in.__doc__ == view.__doc__


def test_every_validated_view_has_its_rule() -> None:
    from qpki.api import views
    from qpki.api.openapi import spec

    validated = {
        name
        for name, obj in vars(views).items()
        if inspect.isfunction(obj) and spec.get_function_metadata(obj) is not None
    }
    assert len(validated) == 11
    assert validated <= {name for _rule, _method, name in RULES}


def _real_view() -> str:
    return "answered"


renamed_view = _real_view


def test_a_view_whose_name_differs_from_its_rule_is_refused() -> None:
    stand_in = LazyView(f"{__name__}.renamed_view")
    with pytest.raises(RuntimeError, match="keep its name"):
        stand_in()
    assert not stand_in.loaded
    assert LazyView(f"{__name__}._real_view")() == "answered"


def test_a_view_name_without_its_module_is_refused() -> None:
    with pytest.raises(ValueError, match=r"'package\.module\.function'"):
        LazyView("verify")
    assert LazyView(f"{__name__}._real_view").__qualname__ == "_real_view"
