"""Views that are imported by their first request (Flask's "Lazily Loading Views" pattern).

Why: ``qpki run`` builds the app once in the gunicorn master and forks the workers from it, so
every module imported while the app is built is resident in every worker (benchmark B6: a
worker ≤ 80 MB). The JSON API's views are declared with spectree and pydantic models; importing
them and building their schemas costs about 9 MB, which the sign-in pages never need. Flask
refuses new URL rules once an app has served a request, so the rules are registered at start-up
with a :class:`LazyView` standing in for each view, and the first call imports the real one.

The stand-in carries the real view's ``__module__``, ``__name__`` and ``__qualname__``: Flask-
Limiter keys a decorated limit by exactly these, so the API's per-key limit finds its view
whether it is loaded yet or not. Once loaded, the stand-in exposes the view as ``__wrapped__``
and its docstring as its own, which is where spectree looks for its validation metadata and
an operation's summary when it builds the OpenAPI document — hence :func:`load_views` before
the document is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask
from werkzeug.utils import import_string

View = Callable[..., Any]


def _identity(view: object) -> tuple[str, str, str]:
    """What Flask-Limiter keys a view by (module, name, qualified name)."""
    return (
        getattr(view, "__module__", ""),
        getattr(view, "__name__", ""),
        getattr(view, "__qualname__", ""),
    )


class LazyView:
    """Stands in for the module-level view ``import_name`` (``"package.module.function"``)."""

    def __init__(self, import_name: str) -> None:
        module, _, name = import_name.rpartition(".")
        if not module or not name:
            raise ValueError(f"a view is named 'package.module.function', not {import_name!r}")
        self.import_name = import_name
        self.__module__ = module
        self.__name__ = name
        self.__qualname__ = name
        self._view: View | None = None

    @property
    def loaded(self) -> bool:
        return self._view is not None

    def load(self) -> View:
        """Import the view (once per process) and take on its docstring and ``__wrapped__``."""
        view = self._view
        if view is None:
            view = import_string(self.import_name)
            if not callable(view) or _identity(view) != _identity(self):
                # The limiter would count this view under another name than its rule's.
                raise RuntimeError(
                    f"{self.import_name} must be a module-level view function whose decorators "
                    f"keep its name (functools.wraps); found {_identity(view)}"
                )
            self.__doc__ = view.__doc__
            self.__wrapped__ = view
            self._view = view
        return view

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.load()(*args, **kwargs)

    def __repr__(self) -> str:
        state = "loaded" if self.loaded else "not loaded"
        return f"<LazyView {self.import_name} ({state})>"


def load_views(app: Flask) -> None:
    """Import every lazily loaded view of ``app`` (before reading them, as spectree does)."""
    for view in app.view_functions.values():
        if isinstance(view, LazyView):
            view.load()
