"""The durable schema (SQLAlchemy 2 declarative). Migrations in ``migrations/`` create it.

Times are stored as UTC epoch seconds (float) so that SQLite and PostgreSQL compare and order
them identically and the pure cores can take ``now: float`` everywhere.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
Id = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    handle: Mapped[str] = mapped_column(String(15), nullable=False)
    # Lower-cased handle: the unique key, so "Alice" and "alice" cannot both exist.
    handle_key: Mapped[str] = mapped_column(String(15), nullable=False, unique=True)
    password_hash: Mapped[str] = mapped_column(String(255), nullable=False)
    is_admin: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    suspended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    suspended_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Kept with each follow and unfollow (same transaction), so a profile read never counts
    # a hundred million rows.
    followers_count: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    following_count: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


class Session(Base):
    """A bearer session. Only the SHA-256 of the token is stored."""

    __tablename__ = "sessions"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False, index=True
    )
    token_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    expires_at: Mapped[float] = mapped_column(Float, nullable=False)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Follow(Base):
    __tablename__ = "follows"

    follower_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True)
    followee_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)

    __table_args__ = (Index("ix_follows_followee", "followee_id"),)


class Post(Base):
    """A post. ``kind`` is ``text`` for what people write; the system writes ``announcement``
    (a space went live, referencing ``space_id``), ``reminder`` and ``replay`` (referencing the
    space whose recording it carries)."""

    __tablename__ = "posts"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False, default="text")
    text: Mapped[str] = mapped_column(Text, nullable=False)
    space_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)

    # Author timelines and the pull-based home feed both walk (account_id, id desc); a space's
    # own posts (announcement, replay) are found by space when it is deleted.
    __table_args__ = (
        Index("ix_posts_account_id_id", "account_id", "id"),
        Index("ix_posts_space_id", "space_id"),
    )


class AuditEntry(Base):
    """Who did what to whom, when and why. Append-only."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, nullable=False)
    # Null actor: the operator at the command line.
    actor_id: Mapped[int | None] = mapped_column(
        ForeignKey("accounts.id", ondelete="SET NULL"), nullable=True
    )
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    target_account_id: Mapped[int | None] = mapped_column(
        ForeignKey("accounts.id", ondelete="SET NULL"), nullable=True
    )
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)


class Space(Base):
    """A live audio room. ``state`` goes scheduled -> live -> ended; ended is final.

    ``version`` is bumped by every change to who is on stage: the bump is the first write of the
    transaction, so it serialises concurrent changes to one space on both SQLite (write lock)
    and PostgreSQL (row lock) before any count is read.
    """

    __tablename__ = "spaces"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    host_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False)
    title: Mapped[str] = mapped_column(Text, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    recorded: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    scheduled_for: Mapped[float | None] = mapped_column(Float, nullable=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # When the recording's media was deleted (retention, a space not recorded): no replay since.
    media_deleted_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=0)

    __table_args__ = (
        Index("ix_spaces_state", "state"),
        Index("ix_spaces_host", "host_id"),
    )


class SpaceMember(Base):
    """Someone with a role above listener: a co-host or a speaker on stage (the host too, once
    on stage). ``grant_id`` names the current speaking grant; removing the row revokes it."""

    __tablename__ = "space_members"

    space_id: Mapped[str] = mapped_column(ForeignKey("spaces.id", ondelete="CASCADE"), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True)
    # host | cohost | speaker
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    on_stage: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    muted: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    muted_by_host: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    hand_raised: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    grant_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    since: Mapped[float] = mapped_column(Float, nullable=False)


class SpeakRequest(Base):
    """A raised hand: a listener asking to speak. Approving moves them on stage."""

    __tablename__ = "speak_requests"

    space_id: Mapped[str] = mapped_column(ForeignKey("spaces.id", ondelete="CASCADE"), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)


class SpaceBlock(Base):
    """An account removed from and barred from one space."""

    __tablename__ = "space_blocks"

    space_id: Mapped[str] = mapped_column(ForeignKey("spaces.id", ondelete="CASCADE"), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    by_id: Mapped[int | None] = mapped_column(ForeignKey("accounts.id", ondelete="SET NULL"), nullable=True)


class SpaceReminder(Base):
    """Someone asked to be told when a scheduled space starts (read on pull: no fan-out)."""

    __tablename__ = "space_reminders"

    space_id: Mapped[str] = mapped_column(ForeignKey("spaces.id", ondelete="CASCADE"), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)

    __table_args__ = (Index("ix_space_reminders_account", "account_id"),)
