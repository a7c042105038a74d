"""RFC 9457 problem details: every error of the JSON API, as ``application/problem+json``.

Each failure family has a stable ``type`` (``urn:qpki:problem:<slug>``) that clients can
switch on; ``title`` is fixed per type and ``detail`` explains this occurrence in words chosen
here or in the service layer — never exception text, a stack trace or a submitted secret.
The reference page (``/api/v1/docs``) lists every type.
"""

from __future__ import annotations

from typing import Any

from flask import Response, json
from werkzeug.exceptions import HTTPException

PROBLEM_MIMETYPE = "application/problem+json"
TYPE_PREFIX = "urn:qpki:problem:"

# slug -> (status, title): the stable vocabulary of the API's errors.
PROBLEMS: dict[str, tuple[int, str]] = {
    "bad-json": (400, "The request body is not valid JSON"),
    "invalid-request": (400, "The request does not follow the schema"),
    "rejected": (400, "The request breaks a rule"),
    "unauthorized": (401, "Authentication required"),
    "forbidden": (403, "Not allowed"),
    "missing-scope": (403, "The service key lacks a scope this operation needs"),
    "enrolment-overdue": (403, "The user must enrol a second factor first"),
    "not-found": (404, "Not found"),
    "method-not-allowed": (405, "Method not allowed"),
    "conflict": (409, "The request conflicts with the current state"),
    "payload-too-large": (413, "The request body is too large"),
    "unsupported-media-type": (415, "Send the body as application/json"),
    "account-locked": (423, "The account is locked"),
    "throttled": (429, "Too many attempts"),
    "rate-limited": (429, "Too many requests for this service key"),
    "unavailable": (503, "The service is temporarily unavailable"),
    "internal": (500, "Internal error"),
}

# A werkzeug status without its own slug is reported under this one.
_BY_STATUS = {
    400: "invalid-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    409: "conflict",
    413: "payload-too-large",
    415: "unsupported-media-type",
    429: "rate-limited",
    503: "unavailable",
}


def problem_response(
    slug: str,
    detail: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
    status: int | None = None,
) -> Response:
    """The problem document for ``slug`` (and its status, unless one is given)."""
    default_status, title = PROBLEMS[slug]
    code = status or default_status
    body: dict[str, Any] = {"type": TYPE_PREFIX + slug, "title": title, "status": code}
    if detail:
        body["detail"] = detail
    if extra:
        body.update(extra)
    response = Response(json.dumps(body), status=code, mimetype=PROBLEM_MIMETYPE)
    response.headers["Cache-Control"] = "no-store"
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


class ProblemError(HTTPException):
    """Raised anywhere in an API request to answer with a problem document."""

    def __init__(self, response: Response) -> None:
        super().__init__(response=response)
        self.code = response.status_code


def abort_problem(
    slug: str,
    detail: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> ProblemError:
    """The exception to raise for ``slug`` (``raise abort_problem(...)``)."""
    return ProblemError(problem_response(slug, detail, headers=headers, extra=extra))


def from_http_exception(exc: HTTPException) -> Response:
    """A werkzeug error (404, 405, 413, a Flask-Limiter 429...) as a problem document.

    Its own headers that describe the error (``Allow`` for 405, ``Retry-After``) are kept;
    its description is not shown (werkzeug's texts are written for HTML pages).
    """
    if isinstance(exc, ProblemError) and exc.response is not None:
        return exc.response  # type: ignore[return-value]
    code = exc.code or 500
    slug = _BY_STATUS.get(code, "invalid-request" if code < 500 else "internal")
    kept = {k: v for k, v in exc.get_headers() if k.lower() in ("allow", "retry-after")}
    return problem_response(slug, headers=kept, status=code)
