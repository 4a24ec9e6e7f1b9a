"""Pure validation of the text people type: handles, passwords, posts, reasons."""

from __future__ import annotations

import re
import unicodedata

import regex

from townhall.errors import UnprocessableEntity

HANDLE_RE = re.compile(r"[A-Za-z0-9_]{1,15}")
POST_MAX_CHARS = 280
PASSWORD_MIN = 8
PASSWORD_MAX = 256
REASON_MAX = 500
_GRAPHEME = regex.compile(r"\X")


def normalize_handle(handle: str) -> str:
    """Check a handle (1-15 of ``[A-Za-z0-9_]``) and return it unchanged."""
    if not isinstance(handle, str) or not HANDLE_RE.fullmatch(handle):
        raise UnprocessableEntity(
            "handle must be 1-15 characters of letters, digits and underscore",
            code="invalid_handle",
        )
    return handle


def handle_key(handle: str) -> str:
    """The case-insensitive key of a handle."""
    return handle.lower()


def check_password(password: str) -> str:
    if len(password) < PASSWORD_MIN or len(password) > PASSWORD_MAX:
        raise UnprocessableEntity(
            f"password must be {PASSWORD_MIN}-{PASSWORD_MAX} characters", code="invalid_password"
        )
    if "\x00" in password:
        raise UnprocessableEntity("password must not contain NUL", code="invalid_password")
    return password


def grapheme_count(text: str) -> int:
    """User-perceived characters (extended grapheme clusters, UAX #29): a family emoji or a
    letter with combining accents counts once, as a person counts them."""
    return len(_GRAPHEME.findall(text))


def clean_text(text: str, *, field: str, max_chars: int, allow_empty: bool = False) -> str:
    """NFC-normalise, strip, refuse control characters (newline and tab allowed) and check the
    length in grapheme clusters."""
    text = unicodedata.normalize("NFC", text).strip()
    for ch in text:
        if ch in "\n\t":
            continue
        cat = unicodedata.category(ch)
        if cat == "Cc" or cat == "Cs":
            raise UnprocessableEntity(f"{field} contains a control character", code="invalid_text")
    count = grapheme_count(text)
    if count == 0 and not allow_empty:
        raise UnprocessableEntity(f"{field} must not be empty", code="invalid_text")
    if count > max_chars:
        raise UnprocessableEntity(
            f"{field} is {count} characters; at most {max_chars} are allowed", code="text_too_long"
        )
    return text


def check_post_text(text: str) -> str:
    return clean_text(text, field="text", max_chars=POST_MAX_CHARS)


def check_reason(reason: str | None, *, required: bool) -> str | None:
    if reason is None or not reason.strip():
        if required:
            raise UnprocessableEntity("a reason is required", code="reason_required")
        return None
    return clean_text(reason, field="reason", max_chars=REASON_MAX)
