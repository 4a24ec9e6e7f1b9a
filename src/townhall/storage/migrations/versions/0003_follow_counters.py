"""Follower and following counters on accounts, so profile reads never count follow rows.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("followers_count", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("following_count", sa.BigInteger(), nullable=False, server_default="0"))
    op.execute(
        "UPDATE accounts SET "
        "followers_count = (SELECT count(*) FROM follows WHERE follows.followee_id = accounts.id), "
        "following_count = (SELECT count(*) FROM follows WHERE follows.follower_id = accounts.id)"
    )


def downgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("following_count")
        batch.drop_column("followers_count")
