"""prometheus_client's multiprocess mode for gunicorn workers, without importing it early.

prometheus_client decides at import time whether values live in the process or in files under
``PROMETHEUS_MULTIPROC_DIR``. ``qpki run`` therefore calls :func:`prepare_multiprocess_dir`
before the app (and :mod:`qpki.api.metrics`) is loaded; this module imports nothing from
prometheus_client at the top for that reason.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import MutableMapping
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_DIR_NAME = "metrics"


def prepare_multiprocess_dir(data_dir: Path, env: MutableMapping[str, str] | None = None) -> Path:
    """Point multiprocess mode at ``<data dir>/metrics``, emptied first.

    Files left by a previous run would be added to this run's counters, so the directory
    starts empty. A directory already named by the environment is used as it is (whoever set
    it manages it).
    """
    env = os.environ if env is None else env
    given = env.get(MULTIPROC_ENV)
    if given:
        return Path(given)
    target = data_dir / METRICS_DIR_NAME
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(mode=0o700, parents=True)
    env[MULTIPROC_ENV] = str(target)
    return target


def mark_worker_dead(pid: int) -> None:
    """gunicorn's ``child_exit``: fold a finished worker's live gauges away."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
