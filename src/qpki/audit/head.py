"""Where the chain head (event count and last seal) is kept, outside the database.

A keyed chain alone cannot show that events were deleted from its end: what is left still
verifies. The head, written after every commit that added events, says how long the chain
was, so ``qpki audit verify`` can say how many events are missing.

- :class:`FileHeadStore` (default): ``<data dir>/.audit_head``, 0600, next to the audit key.
  Right for one machine (any number of workers: updates are serialised with ``flock`` and the
  head only ever moves forward). It is rewritten after every commit that adds events, so
  that write is on the hot path of every sign-in: it overwrites the file in place (one
  ``pwrite`` of a fixed-size record) without ``fsync``, instead of a new file, an ``fsync``,
  a rename and a directory ``fsync`` each time (measured: 12 ms of a 44 ms second step).
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


# The head file's size when advance() writes it: the JSON (about 170 bytes) padded with
# spaces, which JSON parsers ignore, so every write covers the whole file at offset 0.
HEAD_RECORD_SIZE = 256


class FileHeadStore:
    """The head in a 0600 file; concurrent writers (workers) serialise on a lock file.

    The file stays one JSON document. :meth:`advance` overwrites it in place with a
    fixed-size record under the exclusive lock; readers take the shared lock, so they never
    see a half-written record. There is no ``fsync`` per advance: the head must not be more
    durable than the events it counts (SQLite commits in WAL mode with synchronous=NORMAL
    are not fsync-ed either, and a head ahead of the database after a power loss would be a
    false "events missing" alarm), and a head that lags after a crash is what ``verify``
    already tolerates: the events past it must still verify under the key.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = str(path)
        self._lock_path = path.with_name(path.name + ".lock")

    @contextmanager
    def _locked(self, mode: int = fcntl.LOCK_EX) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _parse(self, raw: bytes) -> ChainHead:
        try:
            return ChainHead.from_json(raw.decode())
        except (ValueError, UnicodeError) as exc:
            raise HeadStoreError(f"{self.path}: {exc}") from None

    def read(self) -> ChainHead | None:
        try:
            with self._locked(fcntl.LOCK_SH):
                raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise HeadStoreError(f"{self.path} cannot be read ({exc.__class__.__name__})") from None
        return self._parse(raw)

    def advance(self, head: ChainHead) -> None:
        record = head.to_json().encode()
        if len(record) >= HEAD_RECORD_SIZE:
            raise HeadStoreError(f"{self.path}: a head of {len(record)} bytes does not fit")
        record = record.ljust(HEAD_RECORD_SIZE - 1) + b"\n"
        with self._locked():
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                raw = os.pread(fd, 4096, 0)
                current = self._parse(raw) if raw.strip() else None
                if current is not None and current.seq >= head.seq:
                    return
                os.pwrite(fd, record, 0)
                if len(raw) > HEAD_RECORD_SIZE:  # a longer file written by replace()
                    os.ftruncate(fd, HEAD_RECORD_SIZE)
            finally:
                os.close(fd)

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
