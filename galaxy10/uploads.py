"""Uploads, within limits and in memory: `UploadLimitMiddleware` answers 413 for a request body over the
limit without reading past it, and `upload_form` parses a multipart form with Starlette's public parser,
limited to one file and a few small fields, every file kept in memory: nothing a client sends is ever
written to disk, not even to a temporary file.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import Response
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_FILES = 1  # the image
MAX_FIELDS = 8  # the form's other fields: the model's name
MAX_FIELD_BYTES = 4096  # a model's name, with room to spare


class UploadTooLarge(Exception):
    """Raised from `receive` once a request body crosses the limit."""


class UploadLimitMiddleware:
    """Pure ASGI middleware: answer 413 for a request body over `max_bytes`, never reading past it.

    A declared Content-Length over the limit is refused before a byte of the body is read; a body
    without one (chunked) is counted as it streams in and cut off at the first chunk over the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, too_large: Callable[[Scope], Response]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.too_large = too_large

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self.too_large(scope)(scope, receive, send)
            return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise UploadTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            # Whatever the app made of the aborted body (FastAPI turns it into a 400) is dropped.
            if received > self.max_bytes:
                return
            started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if received <= self.max_bytes:
                raise
        if received > self.max_bytes and not started:
            await self.too_large(scope)(scope, receive, send)


class MalformedForm(Exception):
    """The body is not the multipart form it says it is; `message` says why (Starlette's words)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


async def parse_upload_form(request: Request, max_bytes: int) -> FormData:
    """The request's form, parsed in memory; an empty one unless it is multipart (no file was sent).

    Starlette's `Request.form(max_files=, max_fields=, max_part_size=)` spools every uploaded file over 1 MB
    to a temporary file and has no setting for it, so the form is parsed here by Starlette's own
    `MultiPartParser` with the same limits, on an instance whose spool is the upload limit:
    UploadLimitMiddleware has already refused any body over it, so no file ever reaches the disk.
    test_main uploads 5 MB and fails if a Starlette upgrade makes a temporary file again.
    """
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        return FormData()
    async with aclosing(request.stream()) as stream:
        parser = MultiPartParser(request.headers, stream, max_files=MAX_FILES, max_fields=MAX_FIELDS,
                                 max_part_size=MAX_FIELD_BYTES)
        parser.spool_max_size = max_bytes
        try:
            return await parser.parse()
        except MultiPartException as err:
            raise MalformedForm(err.message) from None


async def upload_form(request: Request) -> AsyncIterator[FormData]:
    """A route's form (a FastAPI dependency), closed once the answer is sent."""
    form = await parse_upload_form(request, request.app.state.settings.max_upload_bytes)
    try:
        yield form
    finally:
        await form.close()


def uploaded_file(form: FormData, name: str) -> UploadFile | None:
    value = form.get(name)
    return value if isinstance(value, UploadFile) else None


def text_field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None
