"""WSGI entry point kept for the seed's commands: ``from app import app``.

``python -c "from app import app; app.db_manager.migrate_database()"`` creates or upgrades the
schema; any WSGI server can serve ``app:app``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from qpki.app import create_app

app = create_app()
