"""Request and response bodies of the public API (they make ``/openapi.json``)."""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, ConfigDict, Field

from townhall.social.text import HANDLE_RE, PASSWORD_MAX, PASSWORD_MIN, REASON_MAX


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Credentials(Body):
    handle: str = Field(min_length=1, max_length=15, pattern=f"^{HANDLE_RE.pattern}$")
    password: str = Field(min_length=PASSWORD_MIN, max_length=PASSWORD_MAX)


class LoginBody(Body):
    handle: str = Field(max_length=64)
    password: str = Field(max_length=PASSWORD_MAX)


class PostBody(Body):
    text: str = Field(description="1-280 characters, counted as a person counts them", max_length=4000)


class ReasonBody(Body):
    reason: str = Field(min_length=1, max_length=REASON_MAX * 4)


class OptionalReasonBody(Body):
    reason: str | None = Field(default=None, max_length=REASON_MAX * 4)


class AccountOut(BaseModel):
    id: int
    handle: str
    created_at: dt.datetime
    is_admin: bool
    suspended: bool
    followers: int | None = None
    following: int | None = None


class SessionOut(BaseModel):
    token: str
    expires_at: dt.datetime


class PostOut(BaseModel):
    id: int
    author: str
    kind: str
    text: str
    space_id: str | None
    created_at: dt.datetime


class PostPage(BaseModel):
    posts: list[PostOut]
    next_cursor: str | None


class AuditOut(BaseModel):
    id: int
    at: dt.datetime
    actor: str | None
    action: str
    target: str | None
    reason: str | None
    detail: str | None


class AuditPage(BaseModel):
    entries: list[AuditOut]
    next_cursor: str | None


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: str
