"""`xqchat serve`'s HTTP side: OpenAI's chat completions API on FastAPI. Requests are checked by
pydantic, queue for the one engine thread in arrival order (a full queue answers 429 with
Retry-After), stream as server-sent events, and stop being generated within a prefill chunk or a
token of the client going away. Errors take OpenAI's shape: {"error": {message, type, param,
code}}. The engine-side work (session reuse, stop strings) is backends/serving.py."""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import threading
import time
import uuid
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel, Field, ValidationInfo, field_validator
from starlette.exceptions import HTTPException

from xqchat.backends.base import GenerationConfig, Model
from xqchat.backends.chat import ContextFull
from xqchat.backends.engine_thread import EngineThread
from xqchat.backends.heap import release_freed_memory
from xqchat.backends.serving import Cancelled, Completion, Completions, Piece
from xqchat.models.errors import XQError
from xqchat.models.tokenizer import Tokenizer

from .options import MIN_TEMPERATURE, SEED_MAX

# request fields xqchat cannot honour, and the values that ask for nothing
UNSUPPORTED = {
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
}
DISCONNECT_POLL_S = 0.2  # how often a waiting request looks for its client having gone


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", **extra):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code = extra.get("param"), extra.get("code")
        self.headers = extra.get("headers")

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, self.status, headers=self.headers)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's new system
    content: str | list[TextPart]

    def as_chat(self) -> dict:
        text = self.content
        if isinstance(text, list):
            text = "".join(part.text for part in text)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completion request that xqchat acts on; others are ignored,
    except those whose meaning it cannot honour (n > 1, logprobs, tools), which are refused."""

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: str | list[str] | None = Field(None)
    n: Literal[1] = 1
    logprobs: Literal[False] | None = None
    tools: list[dict] | None = Field(None, max_length=0)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict | None = None
    response_format: dict | None = None

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _neutral(cls, value, info: ValidationInfo):
        """Fields whose effect xqchat does not have are refused unless neutral, not ignored."""
        if value not in UNSUPPORTED[info.field_name]:
            raise ValueError("not supported here (leave it out)")
        return value

    @field_validator("temperature")
    @classmethod
    def _greedy_or_sampled(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"use 0 (greedy) or at least {MIN_TEMPERATURE:g}")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or not all(stops):
            raise ValueError("up to 4 stop strings, none empty")
        return stops

    def completion(self, limit: int) -> Completion:
        cfg = GenerationConfig(
            max_tokens=self.max_completion_tokens or self.max_tokens or limit,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
        )
        return Completion([m.as_chat() for m in self.messages], cfg, tuple(self.stop or ()))


class Job:
    """One request's pieces, handed from the engine thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()
        self.cancel = threading.Event()

    def put(self, item) -> None:  # from the engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def next(self) -> Piece | None:
        """The next piece; None when the reply is over; raises the request's APIError."""
        item = await self.queue.get()
        if isinstance(item, APIError):
            raise item
        return item


class Server:
    """The model, its engine thread, and the queue in front of it."""

    def __init__(
        self,
        name: str,
        model: Model,
        tokenizer: Tokenizer,
        cache_budget: int,
        queue: int = 32,
        api_key: str | None = None,
    ):
        self.name, self.model, self.api_key, self.limit = name, model, api_key, queue
        self.completions = Completions(model, tokenizer, cache_budget)
        self.thread = EngineThread("xqchat-serve")
        self.active = 0  # requests admitted and not yet finished by the engine
        self.seconds = 1.0  # a running mean of how long the engine takes per request
        self.created = int(time.time())

    def admit(self, completion: Completion) -> Job:
        """Queue `completion` for the engine thread, or refuse it (429) while the queue is full."""
        if self.active >= self.limit:
            wait = max(1, math.ceil(self.seconds * self.active))
            raise APIError(
                429,
                f"the server is busy ({self.active} requests ahead); retry in {wait} s",
                "rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(wait)},
            )
        self.active += 1
        job = Job(asyncio.get_running_loop())
        self.thread.submit(self._work, job, completion)
        return job

    def _finished(self, seconds: float) -> None:  # on the event loop
        self.active -= 1
        self.seconds = 0.8 * self.seconds + 0.2 * seconds

    def _work(self, job: Job, completion: Completion) -> None:  # on the engine thread
        start = time.perf_counter()
        try:
            if not job.cancel.is_set():  # a client that left while queued costs nothing
                for piece in self.completions.run(completion, job.cancel):
                    job.put(piece)
        except Cancelled:
            pass
        except ContextFull as e:
            limit = self.model.spec.max_context
            message = (
                f"the prompt is {e.prompt} tokens; the model's context holds {limit} and the "
                f"reply needs room for up to {e.room} more (ask for fewer max_tokens, or send "
                "fewer messages: nothing is cut here)"
            )
            job.put(APIError(400, message, param="messages", code="context_length_exceeded"))
        except XQError as e:
            job.put(APIError(400, str(e), param="messages"))
        except Exception as e:  # a bug: this request fails, the server goes on
            job.put(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))
        finally:
            job.put(None)
            release_freed_memory()  # a request's transient tensors (backends/heap.py)
            job.loop.call_soon_threadsafe(self._finished, time.perf_counter() - start)

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(
                401,
                "invalid or missing API key (Authorization: Bearer KEY)",
                code="invalid_api_key",
            )

    def check_model(self, model: str) -> None:
        if model != self.name:
            raise APIError(
                404,
                f"the model '{model}' does not exist here; this server has '{self.name}'",
                param="model",
                code="model_not_found",
            )

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "xqchat"}


async def watch(request: Request, cancel: threading.Event) -> None:
    """Set `cancel` when the client disconnects."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    cancel.set()


def usage(piece: Piece) -> dict:
    return {
        "prompt_tokens": piece.prompt_tokens,
        "completion_tokens": piece.completion_tokens,
        "total_tokens": piece.prompt_tokens + piece.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": piece.cached_tokens},
    }


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="xqchat", docs_url=None, redoc_url=None)
    authorized = [Depends(server.check_key)]

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        message = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for ours
        return APIError(400, f"{where}: {message}", param=where or None).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return APIError(error.status_code, str(error.detail)).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        message = f"internal error: {type(error).__name__}: {error}"
        return APIError(500, message, "server_error").response()

    @app.get("/health")
    async def health() -> dict:
        pool = server.completions.pool
        return {
            "status": "ok",
            "model": server.name,
            "requests": server.active,  # running or queued
            "cached_conversations": len(pool.idle),
            "cache_bytes": pool.held,
            "cache_budget": pool.budget,
        }

    @app.get("/v1/models", dependencies=authorized)
    async def models() -> dict:
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model}", dependencies=authorized)
    async def model(model: str) -> dict:
        server.check_model(model)
        return server.model_card()

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(body: ChatRequest, request: Request):
        server.check_model(body.model)
        job = server.admit(body.completion(server.model.spec.max_context))
        watcher = asyncio.create_task(watch(request, job.cancel))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time())}
        head["model"] = server.name
        try:
            first = await job.next()  # errors before the first token keep their status
        except BaseException:
            watcher.cancel()
            job.cancel.set()
            raise
        if first is None:  # the client left before the first token: nobody reads this
            watcher.cancel()
            return APIError(499, "the client closed the request").response()
        if body.stream:
            with_usage = body.stream_options is not None and body.stream_options.include_usage
            return EventSourceResponse(stream(job, first, head, with_usage, watcher))
        try:
            pieces = [first]
            while (piece := await job.next()) is not None:
                pieces.append(piece)
        finally:
            watcher.cancel()
            job.cancel.set()
        last = pieces[-1]
        message = {"role": "assistant", "content": "".join(p.text for p in pieces)}
        choice = {"index": 0, "message": message, "logprobs": None}
        choice["finish_reason"] = last.finish_reason
        return {**head, "object": "chat.completion", "choices": [choice], "usage": usage(last)}

    return app


async def stream(job: Job, piece: Piece | None, head: dict, with_usage: bool, watcher):
    """The reply as chat.completion.chunk events, then (if asked) a usage event, then [DONE]."""

    def event(delta: dict | None, finish: str | None = None, used: Piece | None = None) -> bytes:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        chunk = {**head, "object": "chat.completion.chunk", "choices": choices}
        if with_usage:
            chunk["usage"] = None if used is None else usage(used)
        return format_sse_event(data_str=json.dumps(chunk))

    try:
        yield event({"role": "assistant", "content": ""})
        last = piece
        while piece is not None:
            if piece.text:
                yield event({"content": piece.text})
            if piece.finish_reason in ("stop", "length"):
                yield event({}, piece.finish_reason)
            last, piece = piece, await job.next()
        if with_usage:
            yield event(None, used=last)
        yield format_sse_event(data_str="[DONE]")
    except APIError as e:  # after the first token the status is sent: say it in the stream
        body = {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}
        yield format_sse_event(data_str=json.dumps({"error": body}))
    finally:
        watcher.cancel()
        job.cancel.set()
