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


class SpaceBody(Body):
    title: str = Field(min_length=1, max_length=400)
    scheduled_for: dt.datetime | None = Field(default=None, description="ISO 8601 with a time zone")
    recorded: bool = Field(default=True, description="false: no replay is kept")


class HandleBody(Body):
    handle: str = Field(min_length=1, max_length=15)


class ReactionBody(Body):
    emoji: str = Field(min_length=1, max_length=16)


class SpaceOut(BaseModel):
    id: str
    title: str
    state: str
    host: str
    recorded: bool
    created_at: dt.datetime
    scheduled_for: dt.datetime | None
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    state_url: str
    your_role: str | None = None
    reminders: list[str] | None = None


class SpaceList(BaseModel):
    spaces: list[SpaceOut]


class SpeakerGrantOut(BaseModel):
    handle: str
    role: str
    speaker_token: str
    expires_at: dt.datetime
    whip_url: str
    whep_url: str


class JoinOut(BaseModel):
    ticket: str
    hls_url: str
    expires_at: dt.datetime
    listener: str


class SpeakRequestOut(BaseModel):
    handle: str
    asked_at: dt.datetime


class SpeakRequestList(BaseModel):
    requests: list[SpeakRequestOut]


class NotificationOut(BaseModel):
    kind: str
    space_id: str
    title: str
    host: str
    at: dt.datetime


class NotificationList(BaseModel):
    notifications: list[NotificationOut]
