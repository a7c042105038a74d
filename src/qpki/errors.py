"""The one exception root of the package.

Every failure qPKI raises on purpose derives from :class:`QPKIError`, one subclass per family
(authentication and authorisation in ``qpki.auth.errors``, settings in ``qpki.config``, keys
in ``qpki.auth.keys``, the database in ``qpki.db.manager``), so an embedding application can
catch "anything qPKI refused" in one clause and still tell the families apart.
"""

from __future__ import annotations


class QPKIError(Exception):
    """Base of every deliberate qPKI failure."""
