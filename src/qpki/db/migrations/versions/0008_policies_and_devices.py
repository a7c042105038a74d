"""Policies and devices: per-role 2FA policies (a fresh install requires 2FA for admins with
no grace), per-user grace starts, remembered devices; sign-in methods up to 32 characters
("remembered_device").

Revision ID: 0008_policies_and_devices
Revises: 0007_webauthn
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from qpki.db.base import BigId, UTCDateTime

revision: str = "0008_policies_and_devices"
down_revision: str | None = "0007_webauthn"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None

# The defaults of qpki.auth.services.policy.DEFAULT_POLICIES, written out: a migration must
# not change when that code does.
SEED = [
    {"role": "admin", "require_2fa": True, "grace_hours": 0, "remember_days": 0},
    {"role": "operator", "require_2fa": False, "grace_hours": 72, "remember_days": 30},
    {"role": "viewer", "require_2fa": False, "grace_hours": 72, "remember_days": 30},
]


def upgrade() -> None:
    policies = op.create_table(
        "role_policies",
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("require_2fa", sa.Boolean(), nullable=False),
        sa.Column("grace_hours", sa.Integer(), nullable=False),
        sa.Column("require_phishing_resistant", sa.Boolean(), nullable=False),
        sa.Column("new_device_2fa", sa.Boolean(), nullable=False),
        sa.Column("remember_days", sa.Integer(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=True),
        sa.Column("updated_by", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("role", name="pk_role_policies"),
    )
    op.bulk_insert(
        policies,
        [
            {
                **row,
                "require_phishing_resistant": False,
                "new_device_2fa": False,
                "updated_at": None,
                "updated_by": "",
            }
            for row in SEED
        ],
    )
    op.create_table(
        "policy_grace",
        sa.Column(
            "user_id",
            sa.Integer(),
            sa.ForeignKey("users.id", ondelete="CASCADE", name="fk_policy_grace_user_id_users"),
            nullable=False,
        ),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("enrol_now", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name="pk_policy_grace"),
    )
    op.create_table(
        "remembered_devices",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column(
            "user_id",
            sa.Integer(),
            sa.ForeignKey(
                "users.id", ondelete="CASCADE", name="fk_remembered_devices_user_id_users"
            ),
            nullable=False,
        ),
        sa.Column("series", sa.String(64), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("last_used_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("ip", sa.String(64), nullable=False),
        sa.Column("user_agent", sa.String(256), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_remembered_devices"),
        sa.UniqueConstraint("series", name="uq_remembered_devices_series"),
    )
    op.create_index("ix_remembered_devices_user_id", "remembered_devices", ["user_id"])
    with op.batch_alter_table("user_sessions") as batch:
        batch.alter_column(
            "auth_method",
            existing_type=sa.String(16),
            type_=sa.String(32),
            existing_nullable=False,
            existing_server_default="",
        )


def downgrade() -> None:
    # The older schema has no room for the longer method name; such sessions were opened
    # with the password alone, which is what the older code calls them.
    op.execute(
        "UPDATE user_sessions SET auth_method = 'password' WHERE auth_method = 'remembered_device'"
    )
    with op.batch_alter_table("user_sessions") as batch:
        batch.alter_column(
            "auth_method",
            existing_type=sa.String(32),
            type_=sa.String(16),
            existing_nullable=False,
            existing_server_default="",
        )
    op.drop_index("ix_remembered_devices_user_id", table_name="remembered_devices")
    op.drop_table("remembered_devices")
    op.drop_table("policy_grace")
    op.drop_table("role_policies")
