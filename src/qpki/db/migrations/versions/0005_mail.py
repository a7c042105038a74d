"""mail: the outbox and single-use mailed tokens (password reset, email change).

Revision ID: 0005_mail
Revises: 0004_step_up_and_devices
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from qpki.db.base import BigId, UTCDateTime

revision: str = "0005_mail"
down_revision: str | None = "0004_step_up_and_devices"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("kind", sa.String(48), nullable=False),
        sa.Column(
            "user_id",
            sa.Integer(),
            sa.ForeignKey("users.id", ondelete="SET NULL", name="fk_outbox_user_id_users"),
            nullable=True,
        ),
        sa.Column("recipient", sa.String(254), nullable=False),
        sa.Column("context", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
        sa.Column("lease_until", UTCDateTime(), nullable=True),
        sa.Column("claim_token", sa.String(32), nullable=True),
        sa.Column("sent_at", UTCDateTime(), nullable=True),
        sa.Column("last_error", sa.String(500), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
    )
    op.create_index("ix_outbox_status_next_attempt_at", "outbox", ["status", "next_attempt_at"])
    op.create_index(
        "ix_outbox_user_id_kind_created_at", "outbox", ["user_id", "kind", "created_at"]
    )
    op.create_table(
        "mailed_tokens",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("purpose", sa.String(24), nullable=False),
        sa.Column(
            "user_id",
            sa.Integer(),
            sa.ForeignKey("users.id", ondelete="CASCADE", name="fk_mailed_tokens_user_id_users"),
            nullable=False,
        ),
        sa.Column("new_email", sa.String(254), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("used_at", UTCDateTime(), nullable=True),
        sa.Column("voided_at", UTCDateTime(), nullable=True),
        sa.Column("requested_ip", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_mailed_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_mailed_tokens_token_hash"),
    )
    op.create_index("ix_mailed_tokens_user_id_purpose", "mailed_tokens", ["user_id", "purpose"])


def downgrade() -> None:
    op.drop_index("ix_mailed_tokens_user_id_purpose", table_name="mailed_tokens")
    op.drop_table("mailed_tokens")
    op.drop_index("ix_outbox_user_id_kind_created_at", table_name="outbox")
    op.drop_index("ix_outbox_status_next_attempt_at", table_name="outbox")
    op.drop_table("outbox")
