"""The OpenAPI 3.1 document of ``/api/v1``, generated from the code by spectree.

Why spectree (over flask-smorest and APIFlask): it decorates plain Flask views on our own
blueprint — no framework of its own around the app, its error handlers, CSRF or limits — and
validates with pydantic v2, whose JSON Schema (draft 2020-12) is what OpenAPI 3.1 uses, so the
document is 3.1 without translation. flask-smorest and APIFlask build on apispec and
marshmallow, which emit OpenAPI 3.0 schema dialect (``nullable``) under a 3.1 header, and
APIFlask replaces Flask's app class. spectree installs alone (no dependencies besides
pydantic) with Flask 3 and our pins.

Two things are added to what spectree generates, both from this module's constants: the
bearer security scheme (spectree documents no header-based security for Flask by itself), and
``application/problem+json`` as the media type of every error response (spectree documents
every response as ``application/json``).

Like the views, this module (and with it spectree and pydantic) is imported by the first API
request, not at start-up: see :mod:`qpki.api.lazy`.
"""

from __future__ import annotations

import copy
from typing import Any

from flask import current_app
from pydantic import BaseModel
from spectree import Response as SpecResponse
from spectree import SpecTree

from qpki.api.lazy import load_views
from qpki.api.problems import PROBLEM_MIMETYPE, abort_problem
from qpki.api.schemas import Problem

TITLE = "qPKI API"
VERSION = "1.0.0"
DESCRIPTION = (
    "JSON API for other services: verify a user's second factor, manage users, read the "
    "audit trail. Authenticate with `Authorization: Bearer <service key>`; keys are created "
    "with `qpki api-keys create NAME --scope ...` or under /admin/api-keys. Errors are RFC "
    "9457 problem details with a stable `type`."
)
SECURITY_SCHEME = "serviceKey"
_DOC_KEY = "qpki_openapi_document"


def _before(_req: Any, _resp: Any, error: Exception | None, _instance: Any, _adapter: Any) -> None:
    """A request that fails its schema: a problem document listing where and why.

    The submitted values are left out of the list (one of them may be a code or password).
    """
    if error is None:
        return
    errors = [
        {"loc": [str(part) for part in e.get("loc", ())], "msg": str(e.get("msg", ""))}
        for e in error.errors(include_input=False, include_url=False)  # type: ignore[attr-defined]
    ]
    raise abort_problem(
        "invalid-request", "The request does not follow the schema.", extra={"errors": errors}
    )


spec = SpecTree(
    "flask",
    mode="strict",
    title=TITLE,
    version=VERSION,
    description=DESCRIPTION,
    annotations=False,
    validation_error_status=400,
    before=_before,
    path="api/v1/_spec",  # spectree's own pages are never registered (they load a CDN)
    # Schema names as the classes are called (spectree adds a hash by default).
    naming_strategy=lambda model: model.__name__,
    nested_naming_strategy=lambda _parent, child: child,
)


def responses(status: int, model: type[BaseModel] | None, *errors: int) -> SpecResponse:
    """The documented responses of an operation: its success and its problem statuses.

    401 (no or bad key), 403 (scope), 429 (per-key limit) and 400/415 (body) apply to every
    operation and are always listed.
    """
    codes = {401, 403, 429, 400, *errors}
    kwargs: dict[str, Any] = {f"HTTP_{code}": Problem for code in sorted(codes)}
    if model is None:
        return SpecResponse(f"HTTP_{status}", **kwargs)
    kwargs[f"HTTP_{status}"] = model
    return SpecResponse(**kwargs)


def document() -> dict[str, Any]:
    """The OpenAPI document (built once per app, from its URL map and the decorated views).

    The views are imported on their first request (:mod:`qpki.api.lazy`); spectree reads the
    views of the URL map as they are, so they are all loaded before it does, else the document
    would miss every operation not called yet (and spectree keeps its first document).
    """
    cached = current_app.extensions.get(_DOC_KEY)
    if cached is None:
        load_views(current_app)
        doc = copy.deepcopy(spec.spec)
        doc["openapi"] = "3.1.0"
        doc["servers"] = [{"url": "/"}]
        doc.setdefault("components", {})["securitySchemes"] = {
            SECURITY_SCHEME: {
                "type": "http",
                "scheme": "bearer",
                "description": "A service key: qpki_ followed by 43 characters",
            }
        }
        doc["security"] = [{SECURITY_SCHEME: []}]
        for operations in doc["paths"].values():
            for operation in operations.values():
                for code, response in operation.get("responses", {}).items():
                    content = response.get("content", {})
                    if code.startswith(("4", "5")) and "application/json" in content:
                        content[PROBLEM_MIMETYPE] = content.pop("application/json")
        cached = current_app.extensions[_DOC_KEY] = doc
    return cached


def operations(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The operations of ``doc`` in path order, flattened for the reference page."""
    found = []
    for path, ops in sorted(doc["paths"].items()):
        for method, op in ops.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            found.append(
                {
                    "method": method.upper(),
                    "path": path,
                    "summary": op.get("summary", ""),
                    "description": op.get("description", ""),
                    "parameters": op.get("parameters", []),
                    "body": body.get("schema", {}).get("$ref", "").rsplit("/", 1)[-1],
                    "responses": {
                        code: next(
                            iter(
                                c.get("schema", {}).get("$ref", "").rsplit("/", 1)[-1]
                                for c in r.get("content", {}).values()
                            ),
                            "",
                        )
                        for code, r in sorted(op.get("responses", {}).items())
                    },
                    "anchor": f"{method}-{path}".replace("/", "-").strip("-"),
                }
            )
    return found
