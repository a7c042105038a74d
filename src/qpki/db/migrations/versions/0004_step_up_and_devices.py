"""Step-up and known devices: re-authentication time and sign-in method per session, and
the device cookies that keep an account's owner out of a stranger's throttling.

Revision ID: 0004_step_up_and_devices
Revises: 0003_indexes_and_keyed_audit
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from qpki.db.base import BigId, UTCDateTime

revision: str = "0004_step_up_and_devices"
down_revision: str | None = "0003_indexes_and_keyed_audit"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("user_sessions") as batch:
        batch.add_column(sa.Column("reauth_at", UTCDateTime(), nullable=True))
        batch.add_column(
            sa.Column("auth_method", sa.String(16), nullable=False, server_default="")
        )
    op.create_table(
        "known_devices",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column(
            "user_id",
            sa.Integer(),
            sa.ForeignKey(
                "users.id", ondelete="CASCADE", name="fk_known_devices_user_id_users"
            ),
            nullable=False,
        ),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("throttle_key", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("last_used_at", UTCDateTime(), nullable=False),
        sa.Column("ip", sa.String(64), nullable=False),
        sa.Column("user_agent", sa.String(256), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_known_devices"),
        sa.UniqueConstraint("token_hash", name="uq_known_devices_token_hash"),
    )
    op.create_index("ix_known_devices_user_id", "known_devices", ["user_id"])


def downgrade() -> None:
    op.drop_index("ix_known_devices_user_id", table_name="known_devices")
    op.drop_table("known_devices")
    with op.batch_alter_table("user_sessions") as batch:
        batch.drop_column("auth_method")
        batch.drop_column("reauth_at")
