"""Where the web layer finds the application's services: ``app.extensions["qpki"]``.

A typed accessor instead of ad-hoc attributes on the Flask object, so mypy checks every call
a route makes into the service layer.
"""

from __future__ import annotations

from flask import Flask, current_app

from qpki.auth.services import Services

EXTENSION_KEY = "qpki"


def register_services(app: Flask, services: Services) -> None:
    app.extensions[EXTENSION_KEY] = services


def services_of(app: Flask) -> Services:
    found = app.extensions.get(EXTENSION_KEY)
    if not isinstance(found, Services):
        raise RuntimeError("qPKI services are not registered on this app (use create_app)")
    return found


def services() -> Services:
    """The services of the app handling the current request (or app context)."""
    return services_of(current_app)
