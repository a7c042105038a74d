"""Production serving with gunicorn (pre-fork workers, so ``--workers N`` is real parallelism).

gunicorn over waitress: qPKI's hot paths (argon2, PBKDF2, Fernet) are CPU-bound, so worker
processes use every core where one threaded process would be held by the GIL. The app is built
once in the master (``preload_app``) so that the key file and the secret key are created by
one process only; each worker then drops the pooled database connections it inherited.
Debug mode does not exist here: gunicorn has no debugger and the app forces DEBUG off.
"""

from __future__ import annotations

from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication


class _Gunicorn(BaseApplication):  # type: ignore[misc]
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


def _post_fork(_server: Any, worker: Any) -> None:
    worker.app.application.db_manager.engine.dispose(close=False)


def serve(app: Flask, *, host: str, port: int, workers: int) -> None:
    """Run gunicorn in the foreground until SIGTERM/SIGINT."""
    app.db_manager.engine.dispose()  # type: ignore[attr-defined]
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
        "post_fork": _post_fork,
        "limit_request_field_size": 8190,
        # Forwarded headers are trusted in exactly one place: ProxyFix, by QPKI_PROXY_FIX.
        "forwarded_allow_ips": "",
        # gunicorn >= 24 opens a control socket in the home directory; several instances on
        # one machine would contend for it, and qPKI does not use it.
        "control_socket_disable": True,
    }
    _Gunicorn(app, options).run()
