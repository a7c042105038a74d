"""Prometheus metrics at ``GET /metrics`` (text format), behind the ``metrics`` scope.

Why a scope rather than a separate bind: ``qpki run`` serves one address, behind one load
balancer or proxy; a second listener would need its own gunicorn, port and firewall rules,
while a service key with only ``metrics`` is one line in the Prometheus scrape config
(``authorization: {credentials: qpki_...}``) and is revocable like any key.

Under gunicorn each worker is a process: ``qpki run`` sets ``PROMETHEUS_MULTIPROC_DIR`` (see
:mod:`qpki.api.metrics_dir`) before anything imports prometheus_client, so every worker writes
its counters to files there and a scrape, whichever worker answers it, sums them all.
The outbox depth is read from the database at scrape time, so it is exact on every worker.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from qpki.api.auth import authenticate
from qpki.api.metrics_dir import MULTIPROC_ENV

REQUESTS = Counter(
    "qpki_http_requests",
    "HTTP requests answered, by route pattern, method and status.",
    ["route", "method", "status"],
)
VERIFICATIONS = Counter(
    "qpki_api_verifications",
    "Codes checked through POST /api/v1/verify, by method (totp, backup_code, unknown) and result.",
    ["method", "result"],
)
THROTTLED = Counter(
    "qpki_throttled_attempts",
    "Requests refused for too many attempts: per account (back-off, lock) or per address/key.",
    ["kind"],
)

bp = Blueprint("metrics", __name__)


class OutboxCollector:
    """``qpki_mail_outbox_messages{status}``: the mail outbox by state, read at scrape time."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        from qpki.mail.setup import mail_components

        state = mail_components(self.app).sender.status()
        family = GaugeMetricFamily(
            "qpki_mail_outbox_messages", "Mails in the outbox by state.", labels=["status"]
        )
        for status, count in (
            ("pending", state.pending),
            ("sending", state.sending),
            ("failed", state.failed),
            ("sent", state.sent),
        ):
            family.add_metric([status], count)
        yield family


def count_request(response: Response) -> Response:
    """after_request: one count per answered request, by route pattern (not the raw path)."""
    rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
    REQUESTS.labels(rule, request.method, str(response.status_code)).inc()
    if response.status_code == 429 and not getattr(request, "_qpki_account_throttle", False):
        THROTTLED.labels("rate_limit").inc()
    return response


@bp.get("/metrics")
def metrics() -> Response:
    authenticate("metrics")
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    extra = CollectorRegistry()
    extra.register(OutboxCollector(current_app._get_current_object()))  # type: ignore[attr-defined]
    response = Response(body + generate_latest(extra), content_type=CONTENT_TYPE_LATEST)
    response.headers["Cache-Control"] = "no-store"
    return response
