"""URL converters that refuse values the database cannot hold, before any view runs.

werkzeug's ``int`` converter accepts any run of digits (Unicode digits too) and any size:
``/admin/users/<2**70>`` reached the view, and SQLite raised OverflowError binding the id —
an HTTP 500. Every id in qPKI is a positive 64-bit integer (PostgreSQL BIGINT at most), so the
app's ``int`` converter is replaced by one that matches 1 to 19 ASCII digits and at most
2**63-1. Anything else does not match the route: a plain 404, the same page as for an id that
does not exist. Replacing the converter (rather than adding a new name) covers every route,
including ones added later with ``<int:...>``.
"""

from __future__ import annotations

import builtins

from flask import Flask
from werkzeug.routing import IntegerConverter, Map

MAX_ID = 2**63 - 1


class BoundedIntegerConverter(IntegerConverter):
    """``<int:x>`` limited to 0..2**63-1 in ASCII digits (``max=`` may only lower the bound)."""

    regex = r"[0-9]{1,19}"  # werkzeug derives the signed form, -?[0-9]{1,19}

    def __init__(
        self,
        map: Map,  # werkzeug's parameter names: rules pass them by keyword
        fixed_digits: int = 0,
        min: int | None = None,
        max: int | None = None,
        signed: bool = False,
    ) -> None:
        upper = MAX_ID if max is None else builtins.min(max, MAX_ID)
        lower = min if min is not None else (-MAX_ID - 1 if signed else 0)
        super().__init__(map, fixed_digits=fixed_digits, min=lower, max=upper, signed=signed)


def install_url_converters(app: Flask) -> None:
    """Use the bounded ``int`` converter; call before any blueprint is registered."""
    app.url_map.converters["int"] = BoundedIntegerConverter
