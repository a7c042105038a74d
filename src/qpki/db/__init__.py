"""Database access: engine and sessions, typed base model, Alembic migrations."""

from qpki.db.base import Base, UTCDateTime, utcnow
from qpki.db.manager import DatabaseManager, DatabaseUnavailable

__all__ = ["Base", "DatabaseManager", "DatabaseUnavailable", "UTCDateTime", "utcnow"]
