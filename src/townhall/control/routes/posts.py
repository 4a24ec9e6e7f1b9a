"""Posts, timelines and the home feed."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from townhall.control.deps import Caller, DbDep, MaybeCaller, NodeDep, enforce, iso
from townhall.control.schemas import PostBody, PostOut, PostPage
from townhall.social import accounts, posts
from townhall.storage.models import Account, Post

router = APIRouter(prefix="/api/v1", tags=["posts"])

Cursor = Annotated[str | None, Query(max_length=32, description="next_cursor of the previous page")]
Limit = Annotated[int | None, Query(ge=1, le=100)]
# Ids are 64-bit in the database; a larger number is simply not a post (422, not a 500).
PostId = Annotated[int, Path(ge=1, le=2**63 - 1)]


def post_out(post: Post, author: Account) -> PostOut:
    return PostOut(
        id=post.id,
        author=author.handle,
        kind=post.kind,
        text=post.text,
        space_id=post.space_id,
        created_at=iso(post.created_at),
    )


def page_out(page: posts.Page) -> PostPage:
    return PostPage(posts=[post_out(p, a) for p, a in page.posts], next_cursor=page.next_cursor)


def page_size(node: NodeDep, limit: int | None) -> int:
    return min(limit or node.config.page_size_default, node.config.page_size_max)


@router.post("/posts", status_code=201, response_model=PostOut)
async def create(body: PostBody, caller: Caller, node: NodeDep, db: DbDep) -> PostOut:
    """Post up to 280 characters. Suspended accounts cannot post."""
    posts.require_active(caller, "post")
    await enforce(node, node.config.post_limit_per_account, "post", str(caller.account.id))
    post = await posts.create_post(db, caller, body.text, now=node.clock())
    return post_out(post, caller.account)


@router.get("/posts/{post_id}", response_model=PostOut)
async def show(post_id: PostId, viewer: MaybeCaller, db: DbDep) -> PostOut:
    post, author = await posts.get_post(db, post_id, viewer)
    return post_out(post, author)


@router.delete("/posts/{post_id}", status_code=204)
async def delete(post_id: PostId, caller: Caller, db: DbDep) -> Response:
    await posts.delete_post(db, post_id, caller)
    return Response(status_code=204)


@router.get("/accounts/{handle}/posts", response_model=PostPage)
async def timeline(
    handle: str,
    viewer: MaybeCaller,
    node: NodeDep,
    db: DbDep,
    cursor: Cursor = None,
    limit: Limit = None,
) -> PostPage:
    """An account's posts, newest first. A suspended account's posts are hidden from others."""
    author = await accounts.get_account(db, handle)
    page = await posts.author_posts(db, author, viewer, cursor=cursor, limit=page_size(node, limit))
    return page_out(page)


@router.get("/feed", response_model=PostPage)
async def feed(
    caller: Caller, node: NodeDep, db: DbDep, cursor: Cursor = None, limit: Limit = None
) -> PostPage:
    """The caller's home feed: their posts and those of accounts they follow, newest first."""
    page = await posts.home_feed(db, caller, cursor=cursor, limit=page_size(node, limit))
    return page_out(page)
