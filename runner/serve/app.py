"""The HTTP layer: OpenAI-compatible routes over the scheduler. Thin: it validates requests,
turns them into scheduler Jobs, and the scheduler's events into JSON or server-sent events.
It knows nothing of tensors."""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException

from runner.decoders.grammar import Grammar
from runner.decoders.sampling import Sampling
from runner.serve.metrics import Metrics
from runner.serve.scheduler import Busy, Failed, Finished, Job, Piece, Scheduler, TokenInfo
from runner.serve.schemas import ChatRequest, CompletionRequest, Sampled


@dataclass(frozen=True)
class Settings:
    """What the routes need to know of the server, besides the scheduler."""

    model_name: str
    api_key: str | None
    slots: int
    cache_len: int
    # The recipe's generate.* values: a field a request leaves out takes these.
    sampling: Sampling
    max_tokens: int
    vocab_size: int | None = None  # logit_bias's tokens must be below it


class State:
    """The scheduler appears once the model has loaded (until then /health says 503)."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.scheduler: Scheduler | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)


ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class CountRequests:
    """ASGI middleware counting every response by endpoint and status (streams: the status sent
    first). Pure ASGI, not BaseHTTPMiddleware, so that a client's disconnect still reaches a stream."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.request(endpoint, message["status"])
            await send(message)

        await self.app(scope, receive, counted)


MAX_BODY_BYTES = 8 << 20  # a request body larger than this is refused (413) before it is read


class JsonBodies:
    """ASGI middleware: a POST body is JSON whatever its Content-Type says (`curl -d` sends
    application/x-www-form-urlencoded; OpenAI's API and llama.cpp's server read JSON all the same),
    and one larger than MAX_BODY_BYTES is refused with 413, by its Content-Length or as it arrives."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return await self._too_large(send)
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
        seen, refused = 0, False

        async def counted():
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > MAX_BODY_BYTES and not refused:
                refused = True  # answered here; to the app the client has gone
                await self._too_large(send)
            return {"type": "http.disconnect"} if refused else message

        async def watched(message):
            if not refused:
                await send(message)

        await self.app(scope, counted, watched)

    @staticmethod
    async def _too_large(send):
        await _error_response(ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes",
                                       "invalid_request_error", code="request_too_large"))({"type": "http"}, None, send)



def create_app(state: State) -> FastAPI:
    settings = state.settings
    app = FastAPI(title="runner", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(JsonBodies)
    app.add_middleware(CountRequests, metrics=state.metrics)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        where = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return _error_response(ApiError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}"))
        param = ".".join(where) or None
        message = first.get("msg", "invalid request")
        return _error_response(ApiError(400, f"{param}: {message}" if param else message, param=param,
                                        code="invalid_value"))

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(ApiError(e.status_code, str(e.detail), kind))

    def authorized(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", "authentication_error",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        if state.scheduler is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        s = state.scheduler
        text = state.metrics.render(s.running if s else 0, s.waiting if s else 0)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "runner", "max_model_len": settings.cache_len}]}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        scheduler = _ready(state, body)
        prompts = [scheduler.encode_text(p) if isinstance(p, str) else p for p in body.prompts()]
        for ids in prompts:
            if any(not 0 <= i < scheduler.tokenizer.vocab_size for i in ids):
                raise ApiError(400, f"prompt: token ids must be in [0, {scheduler.tokenizer.vocab_size})",
                               param="prompt")
        return await _answer(state, request, body, prompts, body.logprobs if body.logprobs is not None else -1,
                             chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatRequest, request: Request):
        scheduler = _ready(state, body)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        try:
            ids = scheduler.encode_chat([m.as_dict() for m in body.messages])
        except ValueError as e:
            raise ApiError(400, f"messages: {e}", param="messages") from None
        return await _answer(state, request, body, [ids], body.logprob_count(), chat=True)

    return app


def _ready(state: State, body: Sampled) -> Scheduler:
    if body.model is not None and body.model != state.settings.model_name:
        raise ApiError(404, f"the model {body.model!r} does not exist; this server has {state.settings.model_name!r}",
                       param="model", code="model_not_found")
    if state.scheduler is None:
        raise ApiError(503, "the model is still loading", "service_unavailable")
    return state.scheduler


SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty")


def _sampling(settings: Settings, body: Sampled) -> Sampling:
    """The recipe's sampling with the request's fields in place of its own."""
    given = {name: getattr(body, name) for name in SAMPLING_FIELDS if getattr(body, name) is not None}
    if body.logit_bias is not None:
        biases = {int(token): bias for token, bias in body.logit_bias.items()}
        outside = sorted(t for t in biases if settings.vocab_size is not None and t >= settings.vocab_size)
        if outside:
            raise ApiError(400, f"logit_bias: token ids must be below the vocabulary's {settings.vocab_size}, got "
                           f"{outside[:5]}", param="logit_bias", code="invalid_value")
        given["logit_bias"] = tuple(sorted(biases.items()))
    return dataclasses.replace(settings.sampling, **given)


def _jobs(settings: Settings, body: Sampled, prompts: list[list[int]], logprobs: int,
          grammar: Grammar | None = None) -> list[Job]:
    """n Jobs per prompt, choice i seeded with seed + i; refuses what cannot fit."""
    if body.n * len(prompts) > settings.slots:
        raise ApiError(400, f"n: {body.n * len(prompts)} choices need as many slots; this server has {settings.slots}",
                       param="n")
    requested = getattr(body, "max_completion_tokens", None) or body.max_tokens
    sampling = _sampling(settings, body)
    jobs = []
    for ids in prompts:
        room = settings.cache_len - len(ids)
        if not ids:
            raise ApiError(400, "prompt: it is empty", param="prompt")
        if room < 1:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; the context holds {settings.cache_len} "
                           "(prompt + max_tokens)", param="messages" if body.__class__ is ChatRequest else "prompt",
                           code="context_length_exceeded")
        if requested is not None and requested > room:
            raise ApiError(400, f"max_tokens: the prompt is {len(ids)} tokens and max_tokens {requested}; the context "
                           f"holds {settings.cache_len} (prompt + max_tokens)", param="max_tokens",
                           code="context_length_exceeded")
        max_tokens = requested if requested is not None else min(settings.max_tokens, room)
        for i in range(body.n):
            seed = None if body.seed is None else body.seed + i
            jobs.append(Job(ids, sampling, max_tokens, body.stops(), seed, logprobs, grammar))
    return jobs


def _grammar(scheduler: Scheduler, body: Sampled) -> Grammar | None:
    """The request's response_format compiled (None: plain text); a 400 naming what is wrong."""
    try:
        return scheduler.grammar(body.response_format)
    except ValueError as e:
        field = str(e).split(":", 1)[0]
        raise ApiError(400, str(e), param=field if field.startswith("response_format") else "response_format",
                       code="invalid_value") from None


async def _answer(state: State, request: Request, body: Sampled, prompts: list[list[int]], logprobs: int,
                  chat: bool):
    # Off the event loop: a large schema compiles for a while, and the other streams go on meanwhile.
    grammar = None if body.response_format is None else await asyncio.to_thread(_grammar, state.scheduler, body)
    jobs = _jobs(state.settings, body, prompts, logprobs, grammar)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    emits = [lambda event, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, event)) for i in range(len(jobs))]
    try:
        handles = state.scheduler.submit(jobs, emits)
    except Busy as e:
        raise ApiError(429, f"the server is busy: {e}; retry later", "rate_limit_error",
                       code="rate_limit_exceeded") from None
    shape = _Shape(chat, state.settings.model_name)
    if body.stream:
        return EventSourceResponse(_stream(events, handles, shape, body.include_usage), sep="\n")
    return await _collect(events, handles, shape, request)


class _Shape:
    """OpenAI's JSON for completions or chat completions."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def envelope(self, choices: list, usage: dict | None, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None or not chunk:
            out["usage"] = usage
        return out

    def choice(self, index: int, text: str, tokens: list[TokenInfo] | None, finish: str | None, chunk: bool,
               offset: int = 0) -> dict:
        if self.chat:
            body = {"delta" if chunk else "message": ({"content": text} if chunk else
                                                        {"role": "assistant", "content": text})}
            lp = None if tokens is None else {"content": [_chat_logprob(t) for t in tokens]}
        else:
            body = {"text": text}
            lp = None if tokens is None else _completion_logprobs(tokens, offset)
        return {"index": index, **body, "logprobs": lp, "finish_reason": finish}


def _chat_logprob(t: TokenInfo) -> dict:
    return {"token": t.text, "logprob": t.logprob, "bytes": list(t.bytes),
            "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(b)} for s, b, lp in t.top]}


def _completion_logprobs(tokens: list[TokenInfo], offset: int) -> dict:
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{s: lp for s, _, lp in t.top} for t in tokens], "text_offset": offsets}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


DISCONNECT_CHECK_S = 0.25  # how often a request that is not streamed looks for its client


async def _collect(events: asyncio.Queue, handles: list, shape: _Shape, request: Request):
    """Wait for every choice; a client that hangs up cancels them."""
    n = len(handles)
    texts, tokens = [""] * n, [[] for _ in range(n)]
    finish: list[Finished | None] = [None] * n
    prompt_tokens, checked = {}, time.monotonic()
    try:
        while any(f is None for f in finish):
            if time.monotonic() - checked > DISCONNECT_CHECK_S:  # events may never pause: check by the clock
                checked = time.monotonic()
                if await request.is_disconnected():
                    return JSONResponse(error_body("the client disconnected", "invalid_request_error"), 499)
            try:
                i, event = await asyncio.wait_for(events.get(), timeout=DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                continue
            if isinstance(event, Piece):
                texts[i] += event.text
                if event.token is not None:
                    tokens[i].append(event.token)
            elif isinstance(event, Failed):
                return JSONResponse(error_body(event.message, "server_error"), status_code=500)
            else:
                finish[i] = event
                prompt_tokens[id(handles[i].job.prompt)] = event.prompt_tokens
    finally:
        for h in handles:
            h.cancel()
    want = handles[0].job.logprobs >= 0
    choices = [shape.choice(i, texts[i], tokens[i] if want else None, finish[i].reason, chunk=False) for i in range(n)]
    usage = _usage(sum(prompt_tokens.values()), sum(f.completion_tokens for f in finish))
    return shape.envelope(choices, usage, chunk=False)


async def _stream(events: asyncio.Queue, handles: list, shape: _Shape, include_usage: bool):
    """Server-sent events: a chunk per piece of text, a last chunk per choice with its
    finish_reason, the usage chunk when asked for, then [DONE]. Leaving early (the client hung
    up: sse-starlette cancels this generator) cancels every choice."""
    n = len(handles)
    want = handles[0].job.logprobs >= 0
    offsets = [0] * n
    done, prompt_tokens, completion = 0, {}, 0
    try:
        if shape.chat:
            first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(n)]
            yield {"data": json.dumps(shape.envelope(first, None, chunk=True))}
        while done < n:
            i, event = await events.get()
            if isinstance(event, Piece):
                if not event.text and event.token is None:
                    continue
                tokens = [event.token] if want and event.token is not None else ([] if want else None)
                choice = shape.choice(i, event.text, tokens, None, chunk=True, offset=offsets[i])
                offsets[i] += sum(len(t.text) for t in tokens or [])
                yield {"data": json.dumps(shape.envelope([choice], None, chunk=True))}
            elif isinstance(event, Failed):
                yield {"data": json.dumps(error_body(event.message, "server_error"))}
                return
            else:
                done += 1
                prompt_tokens[id(handles[i].job.prompt)] = event.prompt_tokens
                completion += event.completion_tokens
                choice = shape.choice(i, "", None, event.reason, chunk=True)
                if shape.chat:
                    choice["delta"] = {}
                yield {"data": json.dumps(shape.envelope([choice], None, chunk=True))}
        if include_usage:
            yield {"data": json.dumps(shape.envelope([], _usage(sum(prompt_tokens.values()), completion), chunk=True))}
        yield {"data": "[DONE]"}
    finally:
        for h in handles:
            h.cancel()
