"""Posts, follows and the home feed.

Fan-out on read: a post is one row however many followers its author has, and a home feed is
a query over the accounts the reader follows, walking ``(account_id, id)`` newest first. An
account with a hundred million followers posting costs one write. Posts by suspended accounts
are filtered at read time, so suspension hides them and reinstatement restores them untouched.
"""

from __future__ import annotations

import dataclasses

from sqlalchemy import Select, delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from townhall.errors import BadRequest, Forbidden, NotFound
from townhall.social.accounts import Principal
from townhall.social.text import check_post_text
from townhall.storage.models import Account, Follow, Post
from townhall.storage.paging import keyset_page


@dataclasses.dataclass(frozen=True)
class Page:
    posts: list[tuple[Post, Account]]
    next_cursor: str | None


def require_active(principal: Principal, action: str) -> None:
    """Suspended accounts can read but not act."""
    if principal.is_suspended:
        raise Forbidden(f"a suspended account cannot {action}", code="account_suspended")


async def create_post(
    db: AsyncSession,
    author: Principal,
    text: str,
    *,
    now: float,
    kind: str = "text",
    space_id: str | None = None,
) -> Post:
    require_active(author, "post")
    post = Post(
        account_id=author.account.id,
        kind=kind,
        text=check_post_text(text),
        space_id=space_id,
        created_at=now,
    )
    db.add(post)
    await db.commit()
    return post


def _visible(query: Select[Post, Account], viewer: Principal | None) -> Select[Post, Account]:
    """Hide posts of suspended accounts from everyone but their author and admins."""
    if viewer is not None and viewer.is_admin:
        return query
    if viewer is None:
        return query.where(Account.suspended_at.is_(None))
    return query.where(or_(Account.suspended_at.is_(None), Account.id == viewer.account.id))


async def _page(db: AsyncSession, query: Select[Post, Account], cursor: str | None, limit: int) -> Page:
    rows, next_cursor = await keyset_page(db, query, Post.id, cursor=cursor, limit=limit)
    return Page([(post, author) for post, author in rows], next_cursor)


async def author_posts(
    db: AsyncSession,
    author: Account,
    viewer: Principal | None,
    *,
    cursor: str | None,
    limit: int,
) -> Page:
    query = (
        select(Post, Account).join(Account, Account.id == Post.account_id).where(Post.account_id == author.id)
    )
    return await _page(db, _visible(query, viewer), cursor, limit)


async def home_feed(db: AsyncSession, reader: Principal, *, cursor: str | None, limit: int) -> Page:
    """Posts by the reader and by everyone the reader follows, newest first."""
    followees = select(Follow.followee_id).where(Follow.follower_id == reader.account.id)
    query = (
        select(Post, Account)
        .join(Account, Account.id == Post.account_id)
        .where(or_(Post.account_id == reader.account.id, Post.account_id.in_(followees)))
    )
    return await _page(db, _visible(query, reader), cursor, limit)


async def get_post(db: AsyncSession, post_id: int, viewer: Principal | None) -> tuple[Post, Account]:
    query = select(Post, Account).join(Account, Account.id == Post.account_id).where(Post.id == post_id)
    row = (await db.execute(_visible(query, viewer))).first()
    if row is None:
        raise NotFound("no such post", code="post_not_found")
    post, author = row
    return post, author


async def delete_post(db: AsyncSession, post_id: int, actor: Principal) -> None:
    """Authors delete their own posts; admins any post."""
    post, _ = await get_post(db, post_id, actor)
    if post.account_id != actor.account.id and not actor.is_admin:
        raise Forbidden("only the author or an admin can delete a post", code="not_author")
    await db.execute(delete(Post).where(Post.id == post.id))
    await db.commit()


async def follow(db: AsyncSession, follower: Principal, followee: Account, *, now: float) -> None:
    """Follow an account: one row, and each side's counter moved in the same transaction."""
    require_active(follower, "follow accounts")
    if followee.id == follower.account.id:
        raise BadRequest("an account cannot follow itself", code="self_follow")
    exists = await db.scalar(
        select(Follow.follower_id).where(
            Follow.follower_id == follower.account.id, Follow.followee_id == followee.id
        )
    )
    if exists is not None:
        return
    db.add(Follow(follower_id=follower.account.id, followee_id=followee.id, created_at=now))
    try:
        await db.flush()
    except IntegrityError:  # a concurrent identical follow won; the outcome is the same
        await db.rollback()
        return
    await _move_counts(db, follower.account.id, followee.id, +1)
    await db.commit()


async def _move_counts(db: AsyncSession, follower_id: int, followee_id: int, delta: int) -> None:
    await db.execute(
        update(Account)
        .where(Account.id == followee_id)
        .values(followers_count=Account.followers_count + delta)
    )
    await db.execute(
        update(Account)
        .where(Account.id == follower_id)
        .values(following_count=Account.following_count + delta)
    )


async def unfollow(db: AsyncSession, follower: Principal, followee: Account) -> None:
    result = await db.execute(
        delete(Follow).where(Follow.follower_id == follower.account.id, Follow.followee_id == followee.id)
    )
    if result.rowcount:  # type: ignore[attr-defined]
        await _move_counts(db, follower.account.id, followee.id, -1)
    await db.commit()
