"""Where the chain head (event count and last seal) is kept, outside the database.

A keyed chain alone cannot show that events were deleted from its end: what is left still
verifies. The head, written after every commit that added events, says how long the chain
was, so ``qpki audit verify`` can say how many events are missing.

- :class:`FileHeadStore` (default): ``<data dir>/.audit_head``, 0600, next to the audit key.
  Right for one machine (any number of workers: updates are serialised with ``flock`` and the
  head only ever moves forward).
- :class:`RedisHeadStore` (when ``QPKI_REDIS_URL`` is set): one head shared by every instance,
  moved forward atomically by a Lua script.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from qpki.audit.chain import ChainHead
from qpki.config import REDIS_TIMEOUT_SECONDS, write_private_file
from qpki.errors import QPKIError

HEAD_FILE_NAME = ".audit_head"
REDIS_HEAD_KEY = "qpki:audit:head"


class HeadStoreError(QPKIError):
    """The head cannot be read or written; the message names the store."""


class HeadStore(Protocol):
    """Keeps the newest head; ``advance`` never moves it backwards."""

    description: str

    def read(self) -> ChainHead | None:
        """The stored head, ``None`` when none was ever written; HeadStoreError if unreadable."""
        ...

    def advance(self, head: ChainHead) -> None:
        """Store ``head`` unless the stored one is already at or past its position."""
        ...

    def replace(self, head: ChainHead | None) -> None:
        """Store exactly ``head`` (``None`` removes it): migrations that re-seal the chain."""
        ...


class FileHeadStore:
    """The head in a 0600 file; concurrent writers (workers) serialise on a lock file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = str(path)
        self._lock_path = path.with_name(path.name + ".lock")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def read(self) -> ChainHead | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeError) as exc:
            raise HeadStoreError(f"{self.path} cannot be read ({exc.__class__.__name__})") from None
        try:
            return ChainHead.from_json(text)
        except ValueError as exc:
            raise HeadStoreError(f"{self.path}: {exc}") from None

    def advance(self, head: ChainHead) -> None:
        with self._locked():
            current = self.read()
            if current is None or current.seq < head.seq:
                write_private_file(self.path, head.to_json().encode())

    def replace(self, head: ChainHead | None) -> None:
        with self._locked():
            if head is None:
                self.path.unlink(missing_ok=True)
            else:
                write_private_file(self.path, head.to_json().encode())


# KEYS[1] = head key, ARGV[1] = new seq, ARGV[2] = new head JSON. Moves forward only.
_ADVANCE_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, data = pcall(cjson.decode, cur)
  if ok and tonumber(data['seq']) and tonumber(data['seq']) >= tonumber(ARGV[1]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""


class RedisHeadStore:
    """The head shared by every instance through Redis (the server in ``QPKI_REDIS_URL``)."""

    def __init__(self, url: str, key: str = REDIS_HEAD_KEY) -> None:
        import redis

        # The same sub-second timeouts as the rate limiter: a frozen Redis must cost a sign-in
        # little, not five seconds per write.
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=REDIS_TIMEOUT_SECONDS,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
        )
        self._key = key
        self._advance = self._redis.register_script(_ADVANCE_LUA)
        self.description = f"Redis key {key!r}"

    def read(self) -> ChainHead | None:
        import redis

        try:
            raw = self._redis.get(self._key)
        except redis.RedisError as exc:
            raise HeadStoreError(f"{self.description}: Redis is unavailable ({exc})") from None
        if raw is None:
            return None
        try:
            return ChainHead.from_json(raw.decode() if isinstance(raw, bytes) else str(raw))
        except (ValueError, UnicodeError) as exc:
            raise HeadStoreError(f"{self.description}: {exc}") from None

    def advance(self, head: ChainHead) -> None:
        import redis

        try:
            self._advance(keys=[self._key], args=[head.seq, head.to_json()])
        except redis.RedisError as exc:
            raise HeadStoreError(f"{self.description}: Redis is unavailable ({exc})") from None

    def replace(self, head: ChainHead | None) -> None:
        import redis

        try:
            if head is None:
                self._redis.delete(self._key)
            else:
                self._redis.set(self._key, head.to_json())
        except redis.RedisError as exc:
            raise HeadStoreError(f"{self.description}: Redis is unavailable ({exc})") from None
