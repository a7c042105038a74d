"""The JSON shapes of ``/api/v1``: pydantic models that validate requests (unknown fields are
refused) and from which the OpenAPI document's schemas are generated."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["admin", "operator", "viewer"]


class Strict(BaseModel):
    """Request bodies and queries: an unknown field is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class Problem(BaseModel):
    """RFC 9457 problem details (``application/problem+json``)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="Stable identifier, urn:qpki:problem:<slug>")
    title: str
    status: int
    detail: str | None = None


class VerifyRequest(Strict):
    username: str = Field(min_length=1, max_length=64)
    code: str = Field(
        min_length=1,
        max_length=64,
        description="6-digit TOTP code, or a backup code (with or without '-' and spaces)",
    )


class VerifyResponse(BaseModel):
    result: Literal["accept", "reject"]
    message: str
    method: Literal["totp", "backup_code"] | None = Field(
        default=None, description="Which kind of code was checked, when it was recognised"
    )
    backup_codes_remaining: int | None = Field(
        default=None, description="After an accepted backup code: how many are left"
    )


class UserOut(BaseModel):
    id: int
    username: str
    email: str
    role: Role
    is_active: bool
    two_factor_enabled: bool
    methods: list[str] = Field(description="Second factors the user has: totp, backup_codes")
    backup_codes_remaining: int | None = Field(
        default=None, description="Only on GET /users/{user_id}, when 2FA is on"
    )
    locked: bool = Field(description="Locked after too many failures (an admin unlocks)")
    throttled_until: datetime | None = Field(
        default=None, description="A back-off after failures, until this time"
    )
    failed_attempts: int
    last_sign_in_at: datetime | None = None
    created_at: datetime | None = None
    must_change_password: bool


class UserList(BaseModel):
    users: list[UserOut]
    next_cursor: str | None = Field(
        default=None, description="Pass as 'cursor' for the next page; null on the last page"
    )


class UserListQuery(Strict):
    role: Role | None = None
    two_factor: Literal["enabled", "disabled"] | None = None
    cursor: str | None = Field(default=None, max_length=64)
    limit: int = Field(default=50, ge=1, le=200)


class CreateUserRequest(Strict):
    username: str = Field(min_length=1, max_length=64)
    email: str = Field(default="", max_length=254)
    role: Role = "viewer"
    password: str | None = Field(
        default=None,
        max_length=1024,
        description="Leave out to get a temporary password the user must change",
    )


class CreatedUser(BaseModel):
    user: UserOut
    temporary_password: str | None = Field(
        default=None, description="Shown once when no password was given"
    )


class RoleRequest(Strict):
    role: Role


class ResetRequest(Strict):
    reason: str = Field(min_length=1, max_length=500)


class UnlockResult(BaseModel):
    was_locked: bool


class AuditQuery(Strict):
    event: str | None = Field(default=None, max_length=48)
    outcome: Literal["success", "failure"] | None = None
    user: str | None = Field(default=None, max_length=64)
    since: str | None = Field(default=None, max_length=10, description="YYYY-MM-DD")
    until: str | None = Field(default=None, max_length=10, description="YYYY-MM-DD, inclusive")
    before: int | None = Field(default=None, ge=1, le=2**63 - 1, description="Cursor")
    limit: int = Field(default=50, ge=1, le=200)


class AuditEventOut(BaseModel):
    id: int
    time: datetime
    event: str
    outcome: str
    actor: str
    target: str
    ip: str
    user_agent: str
    details: dict[str, Any]
    hash: str


class AuditPageOut(BaseModel):
    events: list[AuditEventOut]
    next_before: int | None = Field(
        default=None, description="Pass as 'before' for the next (older) page"
    )
    total: int = Field(description="Events matching the filters, counted up to 500")
    total_capped: bool = Field(
        default=False, description="More events match than 'total' (the count stopped at it)"
    )


class ChainStatus(BaseModel):
    ok: bool
    checked: int
    broken_id: int | None = None
    reason: str = ""
    missing: int = 0
