"""How an audit event is sealed: HMAC-SHA256 over the previous seal and the event's content.

Pure functions, shared by :class:`~qpki.audit.log.AuditLog` and the migration that re-sealed
the old unkeyed chain, so both agree byte for byte. Without the audit key nobody can compute
a seal, so a database writer cannot rewrite an event and recompute the chain after it (which
the old public SHA-256 chain allowed). The chain head (count and last seal) is sealed too, so
a head store cannot be fed a made-up head either.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

GENESIS = "0" * 64


class SealedFields(Protocol):
    """What a seal covers: an ORM row or a plain result row with these attributes."""

    seq: int
    occurred_at: datetime
    event: str
    outcome: str
    actor_id: int | None
    actor_name: str
    target_user_id: int | None
    target_name: str
    ip: str
    user_agent: str
    details: str


def canonical(record: SealedFields) -> str:
    """The exact text sealed for a row: every column but id and the hashes, sorted keys."""
    payload = {
        "seq": record.seq,
        "occurred_at": record.occurred_at.isoformat(),
        "event": record.event,
        "outcome": record.outcome,
        "actor_id": record.actor_id,
        "actor_name": record.actor_name,
        "target_user_id": record.target_user_id,
        "target_name": record.target_name,
        "ip": record.ip,
        "user_agent": record.user_agent,
        "details": record.details,
    }
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def seal(key: bytes, prev_hash: str, record: SealedFields) -> str:
    """HMAC-SHA256, under the audit key, of the previous seal followed by the canonical row."""
    return hmac.new(key, (prev_hash + canonical(record)).encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class ChainHead:
    """The newest event's position and seal, as last written by this deployment.

    ``mac`` binds the two under the audit key: a head store that can be written by someone
    without the key still cannot be given a head that verifies.
    """

    seq: int
    hash: str
    mac: str

    @classmethod
    def sealed(cls, key: bytes, seq: int, last_hash: str) -> ChainHead:
        return cls(seq=seq, hash=last_hash, mac=head_mac(key, seq, last_hash))

    def is_authentic(self, key: bytes) -> bool:
        return hmac.compare_digest(self.mac, head_mac(key, self.seq, self.hash))

    def to_json(self) -> str:
        return json.dumps({"seq": self.seq, "hash": self.hash, "mac": self.mac}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ChainHead:
        """Parse a stored head; ValueError when it is not one."""
        try:
            data = json.loads(text)
            head = cls(seq=int(data["seq"]), hash=str(data["hash"]), mac=str(data["mac"]))
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"not an audit chain head ({exc.__class__.__name__})") from None
        if head.seq < 0:
            raise ValueError("not an audit chain head (negative count)")
        return head


def head_mac(key: bytes, seq: int, last_hash: str) -> str:
    """The MAC of a head; domain-separated from event seals by its prefix."""
    return hmac.new(key, f"qpki-audit-head:{seq}:{last_hash}".encode(), hashlib.sha256).hexdigest()
