"""Production serving with gunicorn (pre-fork workers, so ``--workers N`` is real parallelism).

gunicorn over waitress: qPKI's hot paths (argon2, PBKDF2, Fernet) are CPU-bound, so worker
processes use every core where one threaded process would be held by the GIL. The app is built
once in the master (``preload_app``) so that the key file and the secret key are created by
one process only; each worker then drops the pooled database connections it inherited.
Debug mode does not exist here: gunicorn has no debugger and the app forces DEBUG off.
"""

from __future__ import annotations

import gc
from datetime import timedelta
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger
from gunicorn.http import wsgi as gunicorn_wsgi

from qpki.logging_setup import make_formatter


class QpkiGunicornLogger(Logger):
    """gunicorn's error and access logs in qPKI's format (JSON lines with QPKI_LOG_JSON=1).

    The access line is built from the WSGI environ *after* the application ran, so
    ``REMOTE_ADDR`` is the client's address as ProxyFix established it from the trusted hop
    (QPKI_PROXY_FIX), not the proxy's socket address. The query string is left out: it is
    not needed to operate the service and could carry tokens.
    """

    json_lines = False
    instance = ""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        formatter = make_formatter(json_lines=self.json_lines, instance=self.instance or None)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(formatter)

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        if not self.cfg.accesslog:
            return
        status = str(resp.status).split(None, 1)[0]
        elapsed = request_time if isinstance(request_time, timedelta) else timedelta(0)
        fields = {
            "remote_addr": environ.get("REMOTE_ADDR", "-"),
            "method": environ.get("REQUEST_METHOD", "-"),
            "path": environ.get("PATH_INFO", "-"),
            "status": int(status) if status.isdigit() else status,
            "bytes": getattr(resp, "sent", None),
            "duration_ms": round(elapsed.total_seconds() * 1000, 1),
            "user_agent": environ.get("HTTP_USER_AGENT", "-")[:256],
        }
        self.access_log.info(
            '%s "%s %s" %s %s %.1fms',
            fields["remote_addr"],
            fields["method"],
            fields["path"],
            fields["status"],
            fields["bytes"] if fields["bytes"] is not None else "-",
            fields["duration_ms"],
            extra=fields,
        )


class _Gunicorn(BaseApplication):
    def __init__(self, app: Flask, options: dict[str, Any]) -> None:
        self.application = app
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if key in self.cfg.settings:  # older gunicorn lacks some settings
                self.cfg.set(key, value)

    def load(self) -> Flask:
        return self.application


class _UnnamedResponse(gunicorn_wsgi.Response):
    """gunicorn's HTTP/1 response without its ``Server: gunicorn`` line.

    Naming the server software only helps someone matching it to known vulnerabilities.
    gunicorn has no setting for it (benoitc/gunicorn#825) and ignores a ``Server`` header set
    by the app (it would send both), so the line is dropped where gunicorn writes it.
    tests/deploy/test_one_machine.py checks the real server's responses.
    """

    def default_headers(self) -> list[str]:
        headers: list[str] = super().default_headers()
        return [line for line in headers if not line.lower().startswith("server:")]


def _post_fork(_server: Any, worker: Any) -> None:
    worker.app.application.db_manager.engine.dispose(close=False)


def _child_exit(_server: Any, worker: Any) -> None:
    """A worker ended: prometheus_client folds its multiprocess files (qpki.api.metrics)."""
    from qpki.api.metrics_dir import mark_worker_dead

    mark_worker_dead(worker.pid)


def serve(app: Flask, *, host: str, port: int, workers: int) -> None:
    """Run gunicorn in the foreground until SIGTERM/SIGINT."""
    app.db_manager.engine.dispose()  # type: ignore[attr-defined]
    # Installed before the fork, so every worker builds its responses from it.
    gunicorn_wsgi.Response = _UnnamedResponse
    settings = app.settings  # type: ignore[attr-defined]
    logger_class = type(
        "QpkiLogger",
        (QpkiGunicornLogger,),
        {"json_lines": settings.log_json, "instance": settings.instance_name},
    )
    options = {
        "bind": f"{host}:{port}",
        "workers": workers,
        "worker_class": "sync",
        "preload_app": True,
        "timeout": 60,
        "graceful_timeout": 10,
        "accesslog": "-",
        "errorlog": "-",
        "loglevel": "info",
        "logger_class": logger_class,
        "post_fork": _post_fork,
        "child_exit": _child_exit,
        "limit_request_field_size": 8190,
        # Forwarded headers are trusted in exactly one place: ProxyFix, by QPKI_PROXY_FIX.
        "forwarded_allow_ips": "",
        # gunicorn >= 24 opens a control socket in the home directory; several instances on
        # one machine would contend for it, and qPKI does not use it.
        "control_socket_disable": True,
    }
    # Everything built so far (the app, its modules, SQLAlchemy's and pydantic's tables) lives
    # as long as the process: out of the collector's sight, a full collection in a worker
    # walks only what requests made, instead of pausing a request for every module object.
    # (It also keeps collections from touching, and so copying, the pages workers share.)
    gc.freeze()
    _Gunicorn(app, options).run()
