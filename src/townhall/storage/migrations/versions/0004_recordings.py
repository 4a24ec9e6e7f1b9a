"""Recordings: when a space's media was deleted (retention, not recorded, deletion), and an
index to find a space's posts (its announcement and replay) without scanning every post.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("spaces") as batch:
        batch.add_column(sa.Column("media_deleted_at", sa.Float(), nullable=True))
    op.create_index("ix_posts_space_id", "posts", ["space_id"])


def downgrade() -> None:
    op.drop_index("ix_posts_space_id", table_name="posts")
    with op.batch_alter_table("spaces") as batch:
        batch.drop_column("media_deleted_at")
