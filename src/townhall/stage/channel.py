"""The pipe between a node and its stage process: framed messages over a local socket pair.

Theory of operation
-------------------
A frame is an 8-byte header (two big-endian uint32: the JSON header's length, the payload's
length), a JSON object, then raw payload bytes (an encoded part, never base64). Three kinds:

- a *request* carries ``"id"`` and ``"op"``; exactly one *reply* answers it, carrying ``"re"``
  (the request's id) and either its result fields or ``"error": {status, code, message}``;
- a *notification* carries ``"op"`` and no id; nobody answers it.

Either side may send either kind; requests may overlap (replies are matched by id). Both ends
are our own processes on one machine, so the format is plain and strict: a malformed frame is
a broken pipe, and the supervisor restarts the stage process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)

HEADER = struct.Struct(">II")
MAX_JSON = 1 << 20
MAX_PAYLOAD = 16 << 20

Message = dict[str, Any]


class StageError(Exception):
    """A request the stage refused: carried back to the node as an API status and code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class ChannelClosed(Exception):
    """The other process went away (or sent something that is not a frame)."""


def encode(message: Message, payload: bytes = b"") -> bytes:
    head = json.dumps(message, separators=(",", ":")).encode()
    if len(head) > MAX_JSON or len(payload) > MAX_PAYLOAD:
        raise ValueError("stage message too large")
    return HEADER.pack(len(head), len(payload)) + head + payload


async def read_frame(reader: asyncio.StreamReader) -> tuple[Message, bytes]:
    try:
        n_json, n_payload = HEADER.unpack(await reader.readexactly(HEADER.size))
        if n_json > MAX_JSON or n_payload > MAX_PAYLOAD:
            raise ChannelClosed("oversize stage frame")
        message = json.loads(await reader.readexactly(n_json))
        payload = await reader.readexactly(n_payload) if n_payload else b""
    except (asyncio.IncompleteReadError, ConnectionError, json.JSONDecodeError) as exc:
        raise ChannelClosed(str(exc)) from exc
    if not isinstance(message, dict) or not isinstance(message.get("op", message.get("re")), str | int):
        raise ChannelClosed("a stage frame without op or re")
    return message, payload


# A handler answers a request with its result fields (or raises StageError); for a
# notification its return value is ignored.
Handler = Callable[[Message, bytes], Awaitable[Message | None]]


class Channel:
    """Requests, replies and notifications over one stream pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler) -> None:
        self._reader = reader
        self._writer = writer
        self._handler = handler
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    def notify(self, op: str, payload: bytes = b"", **fields: Any) -> None:
        if not self.closed:
            self._writer.write(encode({"op": op, **fields}, payload))

    async def request(self, op: str, wait: float = 10.0, **fields: Any) -> Message:
        if self.closed:
            raise ChannelClosed("the stage process is not running")
        rid = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        try:
            self._writer.write(encode({"op": op, "id": rid, **fields}))
            await self._writer.drain()
            async with asyncio.timeout(wait):
                reply = await future
        except ConnectionError as exc:
            raise ChannelClosed(str(exc)) from exc
        finally:
            self._waiting.pop(rid, None)
        error = reply.get("error")
        if isinstance(error, dict):
            raise StageError(int(error["status"]), str(error["code"]), str(error["message"]))
        return reply

    async def run(self) -> None:
        """Read frames until the other side goes away; then fail every pending request."""
        try:
            while True:
                message, payload = await read_frame(self._reader)
                if "re" in message:
                    future = self._waiting.get(int(message["re"]))
                    if future is not None and not future.done():
                        future.set_result(message)
                elif "id" in message:
                    task = asyncio.create_task(self._answer(message, payload))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                else:
                    await self._handler(message, payload)
        except ChannelClosed:
            pass
        finally:
            self.closed = True
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(ChannelClosed("the stage process went away"))
            for task in list(self._tasks):
                task.cancel()

    async def _answer(self, message: Message, payload: bytes) -> None:
        reply: Message
        try:
            reply = await self._handler(message, payload) or {}
        except StageError as exc:
            reply = {"error": {"status": exc.status, "code": exc.code, "message": exc.message}}
        except Exception as exc:  # a bug in one request must not take the stage down
            logger.exception("stage request failed", extra={"op": message.get("op")})
            reply = {"error": {"status": 500, "code": "stage_error", "message": type(exc).__name__}}
        if not self.closed:
            self._writer.write(encode({**reply, "re": message["id"]}))
            with contextlib.suppress(ConnectionError):
                await self._writer.drain()

    async def close(self) -> None:
        self.closed = True
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
