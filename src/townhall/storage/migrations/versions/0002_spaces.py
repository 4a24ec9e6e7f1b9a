"""Spaces: the room, its stage members, raised hands, blocks and reminders.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _space_fk() -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(
        "space_id", sa.String(16), sa.ForeignKey("spaces.id", ondelete="CASCADE"), primary_key=True
    )


def _account_fk() -> sa.Column:  # type: ignore[type-arg]
    return sa.Column("account_id", Id, sa.ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True)


def upgrade() -> None:
    op.create_table(
        "spaces",
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("host_id", Id, sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("recorded", sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("scheduled_for", sa.Float(), nullable=True),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False, server_default="0"),
    )
    op.create_index("ix_spaces_state", "spaces", ["state"])
    op.create_index("ix_spaces_host", "spaces", ["host_id"])
    op.create_table(
        "space_members",
        _space_fk(),
        _account_fk(),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("on_stage", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("muted", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("muted_by_host", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("hand_raised", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("grant_id", sa.String(32), nullable=True),
        sa.Column("since", sa.Float(), nullable=False),
    )
    op.create_table(
        "speak_requests",
        _space_fk(),
        _account_fk(),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "space_blocks",
        _space_fk(),
        _account_fk(),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("by_id", Id, sa.ForeignKey("accounts.id", ondelete="SET NULL"), nullable=True),
    )
    op.create_table(
        "space_reminders",
        _space_fk(),
        _account_fk(),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_space_reminders_account", "space_reminders", ["account_id"])


def downgrade() -> None:
    op.drop_index("ix_space_reminders_account", table_name="space_reminders")
    op.drop_table("space_reminders")
    op.drop_table("space_blocks")
    op.drop_table("speak_requests")
    op.drop_table("space_members")
    op.drop_index("ix_spaces_host", table_name="spaces")
    op.drop_index("ix_spaces_state", table_name="spaces")
    op.drop_table("spaces")
