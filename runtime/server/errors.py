"""Errors and the guard around every request: no request ever gets a plain-text 500 or a
traceback in its body.

- `ApiError`: an error answered in OpenAI's shape `{"error": {"message", "type", "param",
  "code"}}`; `api_error(err)` maps the runtime's exceptions to it (a `UserError` is a 400 naming
  the API field, a non-finite result a 422, anything else a 500 "internal error").
- `Guard`: pure ASGI middleware around the app (inside Starlette's own error middleware, which
  it leaves nothing to do): adds `x-replica`, refuses bodies over `MAX_BODY_BYTES` (413), and
  turns any exception that escapes a route into a JSON 500, logged once here with its traceback.
  An exception after the answer started (a stream) is logged and the response ended; streams
  catch their own errors first and end in an `error` event.
- `install(app)`: the exception handlers for `ApiError`, FastAPI's validation errors (path
  parameters) and Starlette's HTTP errors (unknown route 404, method 405), all OpenAI-shaped.
"""

from __future__ import annotations

import json
import logging
import re

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.errors import ResultError, UserError

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 32 << 20  # a 20 MiB image as base64 in a chat request, and the JSON around it

# runtime argument -> API field, for the messages of the runtime's own checks
API_NAMES = {
    "steps": "num_inference_steps",
    "guidance": "guidance_scale",
    "decoder_steps": "decoder_num_inference_steps",
    "decoder_guidance": "decoder_guidance_scale",
    "num_images": "n",
    "max_new_tokens": "max_tokens",
}


class JsonResponse(JSONResponse):
    """JSON answers in ASCII: a lone surrogate echoed from a request cannot break encoding."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


class ApiError(Exception):
    """An error answered in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, " ".join(message.split()), type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JsonResponse:
        return JsonResponse(self.body(), status_code=self.status, headers=self.headers)


def internal_error(err: BaseException | None = None) -> ApiError:
    what = f" ({type(err).__name__})" if err is not None else ""
    return ApiError(
        500,
        f"internal server error{what}; it was logged on the server",
        type="server_error",
        code="internal_error",
    )


def api_error(err: BaseException, names: dict | None = None) -> ApiError:
    """The HTTP error for an exception out of the runtime or the scheduler. `names` renames the
    runtime's argument in a `UserError` to the API's field (default `API_NAMES`)."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, UserError):
        names = API_NAMES if names is None else names
        message = " ".join(str(err).split())
        first = message.split(" ", 1)[0]
        param = names.get(first, first if re.fullmatch(r"[a-z_]+", first) else None)
        if first in names:
            message = names[first] + message[len(first) :]
        return ApiError(400, message, param=param)
    if isinstance(err, ResultError):
        return ApiError(422, str(err), code="result_not_finite")
    return internal_error(err)


class BodyTooLarge(Exception):
    pass


def too_large() -> ApiError:
    return ApiError(
        413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB", code="body_too_large"
    )


class Guard:
    """Pure ASGI middleware (Starlette's BaseHTTPMiddleware would hide the client's disconnect
    from `request.is_disconnected()`): `x-replica`, the body limit, and the last resort for an
    exception no handler took: a JSON 500, logged once."""

    def __init__(self, app, state) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = ended = False
        replica = (b"x-replica", self.state.replica.encode("utf-8", "replace"))

        async def send_guarded(message):
            nonlocal started, ended
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), replica]}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                ended = True
            await send(message)

        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            return await self._answer(send_guarded, too_large())
        seen = 0

        async def receive_limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY_BYTES:
                    raise BodyTooLarge()
            return message

        try:
            await self.app(scope, receive_limited, send_guarded)
        except BodyTooLarge:
            if not started:
                await self._answer(send_guarded, too_large())
        except Exception as err:
            log.error(
                "%s %s failed", scope.get("method"), scope.get("path"), exc_info=err
            )  # the one log line of this error (no handler re-raises it to the server)
            if not started:
                await self._answer(send_guarded, internal_error(err))
            elif not ended:
                await send_guarded({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _answer(send, err: ApiError) -> None:
        response = err.response()
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": response.raw_headers,
            }
        )
        await send({"type": "http.response.body", "body": response.body})


def install(app) -> None:
    """OpenAI-shaped answers for `ApiError`, FastAPI's and Starlette's own errors."""

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("body", "path"))
        message = f"{where}: {first.get('msg', 'invalid request')}"
        return ApiError(400, message, param=where or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, err: StarletteHTTPException):
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        headers = dict(err.headers or {})
        return ApiError(err.status_code, str(err.detail), type=kind, headers=headers).response()
