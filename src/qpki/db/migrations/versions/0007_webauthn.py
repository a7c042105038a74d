"""webauthn: passkeys and security keys, each user's handle, pending ceremonies.

Revision ID: 0007_webauthn
Revises: 0006_api_keys
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from qpki.db.base import BigId, UTCDateTime

revision: str = "0007_webauthn"
down_revision: str | None = "0006_api_keys"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "webauthn_credentials",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column(
            "user_id",
            sa.Integer(),
            sa.ForeignKey(
                "users.id", ondelete="CASCADE", name="fk_webauthn_credentials_user_id_users"
            ),
            nullable=False,
        ),
        sa.Column("credential_id", sa.String(1400), nullable=False),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.Column("sign_count", sa.BigInteger(), nullable=False),
        sa.Column("transports", sa.String(200), nullable=False),
        sa.Column("aaguid", sa.String(36), nullable=False),
        sa.Column("backup_eligible", sa.Boolean(), nullable=False),
        sa.Column("backed_up", sa.Boolean(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("last_used_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_webauthn_credentials"),
        sa.UniqueConstraint("credential_id", name="uq_webauthn_credentials_credential_id"),
        sa.UniqueConstraint("user_id", "name", name="uq_webauthn_credentials_user_name"),
    )
    op.create_table(
        "webauthn_user_handles",
        sa.Column(
            "user_id",
            sa.Integer(),
            sa.ForeignKey(
                "users.id", ondelete="CASCADE", name="fk_webauthn_user_handles_user_id_users"
            ),
            nullable=False,
        ),
        sa.Column("handle", sa.LargeBinary(64), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name="pk_webauthn_user_handles"),
        sa.UniqueConstraint("handle", name="uq_webauthn_user_handles_handle"),
    )
    op.create_table(
        "webauthn_challenges",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("challenge", sa.String(64), nullable=False),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("binding_hash", sa.String(64), nullable=False),
        sa.Column(
            "user_id",
            sa.Integer(),
            sa.ForeignKey(
                "users.id", ondelete="CASCADE", name="fk_webauthn_challenges_user_id_users"
            ),
            nullable=True,
        ),
        sa.Column("payload", sa.String(200), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_webauthn_challenges"),
        sa.UniqueConstraint("challenge", name="uq_webauthn_challenges_challenge"),
    )
    op.create_index("ix_webauthn_challenges_binding_hash", "webauthn_challenges", ["binding_hash"])
    op.create_index("ix_webauthn_challenges_user_id", "webauthn_challenges", ["user_id"])
    op.create_index("ix_webauthn_challenges_expires_at", "webauthn_challenges", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_webauthn_challenges_expires_at", table_name="webauthn_challenges")
    op.drop_index("ix_webauthn_challenges_user_id", table_name="webauthn_challenges")
    op.drop_index("ix_webauthn_challenges_binding_hash", table_name="webauthn_challenges")
    op.drop_table("webauthn_challenges")
    op.drop_table("webauthn_user_handles")
    op.drop_table("webauthn_credentials")
