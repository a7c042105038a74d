"""B7's ceiling: the smallest Flask app ("ok"), served by gunicorn exactly like ``qpki run``."""

from __future__ import annotations

from flask import Flask

app = Flask(__name__)


@app.get("/")
def ok() -> str:
    return "ok"
