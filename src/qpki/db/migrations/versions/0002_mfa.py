"""Two-factor authentication: pending enrolments, TOTP replay guard, backup-code versioning.

Revision ID: 0002_mfa
Revises: 0001_foundation
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from qpki.db.base import UTCDateTime

revision: str = "0002_mfa"
down_revision: str | None = "0001_foundation"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(
            sa.Column("backup_codes_version", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("totp_last_step", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("mfa_enabled_at", UTCDateTime(), nullable=True))

    op.create_table(
        "mfa_setup_sessions",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("secret", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_mfa_setup_sessions"),
        sa.UniqueConstraint("user_id", name="uq_mfa_setup_sessions_user_id"),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name="fk_mfa_setup_sessions_user_id_users",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_mfa_setup_sessions_user_id", "mfa_setup_sessions", ["user_id"])
    op.create_index("ix_mfa_setup_sessions_expires_at", "mfa_setup_sessions", ["expires_at"])


def downgrade() -> None:
    op.drop_table("mfa_setup_sessions")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("mfa_enabled_at")
        batch.drop_column("totp_last_step")
        batch.drop_column("backup_codes_version")
