"""The OpenAI-compatible HTTP API over an :class:`~fluid.serve.engine.Engine` (FastAPI).

``POST /v1/chat/completions`` (the checkpoint's chat template), ``POST /v1/completions``,
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text). ``stream=true`` sends
server-sent events, a chunk per forward that committed visible text, then ``data: [DONE]``.
Errors are ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from fluid.decoding.state import StopRule, visible_text
from fluid.serve import protocol as P
from fluid.serve.engine import Engine, QueueFull
from fluid.serve.engine import Request as EngineRequest

log = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.5


@dataclass
class Limits:
    max_tokens: int = 1024          # the most tokens one request may generate
    default_max_tokens: int | None = None   # chat without max_tokens: None = all the room left
    max_body_bytes: int = 1 << 20
    context: int = 2048             # the model's context (prompt + generated)


class TextStream:
    """The visible text of a growing token list, handed out in deltas whose concatenation is the
    final text: a tail that may still become a stop string, or an incomplete character, is held back."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.sent = ""

    def feed(self, new: list[int]) -> str:
        self.tokens.extend(new)
        text = visible_text(self.tokenizer, self.tokens, self.stop)
        hold = len(text) - len(text.rstrip("\ufffd"))  # an incomplete character at the end
        for s in self.stop:  # the longest tail that is the start of a stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        ready = text[: len(text) - hold] if hold else text
        if not ready.startswith(self.sent) or len(ready) <= len(self.sent):
            return ""
        delta, self.sent = ready[len(self.sent):], ready
        return delta

    def finish(self) -> str:
        text = visible_text(self.tokenizer, self.tokens, self.stop)
        if not text.startswith(self.sent):
            log.warning("streamed text is not a prefix of the final text; the rest is sent as it is")
            return text[len(self.sent):] if len(text) > len(self.sent) else ""
        delta, self.sent = text[len(self.sent):], text
        return delta


def error(e: P.RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def create_app(engine: Engine, tokenizer, model_name: str, limits: Limits, vocab_size: int,
               stop_strings: list[str] | None = None) -> FastAPI:
    from fluid.generate import prompt_text

    app = FastAPI(title="FLUID", docs_url=None, redoc_url=None)
    metrics = engine.metrics
    server_stops = list(stop_strings or [])

    async def read_json(request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limits.max_body_bytes:
            raise P.RequestError(None, f"the body is larger than {limits.max_body_bytes} bytes", 413)
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > limits.max_body_bytes:
                raise P.RequestError(None, f"the body is larger than {limits.max_body_bytes} bytes", 413)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise P.RequestError(None, f"the body is not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(body, dict):
            raise P.RequestError(None, "the body must be a JSON object")
        return body

    def build_job(body: dict, kind: str) -> P.Job:
        model, stream, include_usage = P.parse_common(body, model_name)
        stop = P.parse_stop(body)
        if kind == "chat":
            msgs = P.parse_messages(body)
            if msgs[-1]["role"] == "assistant":
                raise P.RequestError("messages", "the last message must not be the assistant's (it would be dropped)")
            try:
                text = prompt_text(tokenizer, msgs, True)
            except Exception as e:  # noqa: BLE001 - no chat template, or one that refuses these messages
                raise P.RequestError("messages", f"the chat template cannot render them ({str(e).splitlines()[0]})",
                                     ) from None
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            field, default = "messages", limits.default_max_tokens
        else:
            prompt = P.parse_prompt(body, vocab_size)
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else prompt
            field, default = "prompt", 16  # the OpenAI API's default for completions
        if not ids:
            raise P.RequestError(field, "is empty once tokenized")
        room = limits.context - len(ids)
        if room < 1:
            raise P.RequestError(field, f"the prompt is {len(ids)} tokens; the context holds {limits.context}")
        max_tokens = P.parse_max_tokens(body, default, room, limits.max_tokens)
        return P.Job(kind=kind, model=model, prompt_ids=ids, max_tokens=max_tokens, stop=stop, stream=stream,
                     include_usage=include_usage)

    def count(endpoint: str, status: int) -> None:
        metrics.requests.labels(endpoint, str(status)).inc()

    async def complete(request: Request, kind: str, endpoint: str):
        try:
            job = build_job(await read_json(request), kind)
        except P.RequestError as e:
            count(endpoint, e.status)
            return error(e)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stops = job.stop + server_stops
        req = EngineRequest(prompt=job.prompt_ids, rule=StopRule(job.max_tokens, tokenizer.eos_token_id, tokenizer, stops),
                            on_event=lambda k, v: loop.call_soon_threadsafe(events.put_nowait, (k, v)))
        try:
            engine.submit(req)
        except QueueFull as e:
            count(endpoint, 503)
            return error(P.RequestError(None, str(e), 503, "server_overloaded"))
        text = TextStream(tokenizer, stops)
        if job.stream:
            count(endpoint, 200)
            # the background task also frees the row if the stream is cancelled before it starts
            return StreamingResponse(stream(job, req, events, text), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(engine.cancel, req))
        try:
            while True:
                try:
                    kind_, payload = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        engine.cancel(req)
                        count(endpoint, 499)
                        return Response(status_code=499)
                    continue
                if kind_ == "tokens":
                    text.tokens.extend(payload)
                elif kind_ == "done":
                    count(endpoint, 200)
                    return JSONResponse(P.response(job, text.finish(), payload.finished, len(payload.tokens)))
                else:
                    count(endpoint, 500)
                    return error(P.RequestError(None, f"the request failed: {payload}", 500, "server_error"))
        except asyncio.CancelledError:
            engine.cancel(req)
            raise

    async def stream(job: P.Job, req: EngineRequest, events: asyncio.Queue, text: TextStream):
        def sse(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        try:
            if job.kind == "chat":
                yield sse(P.chunk(job, role=True))
            while True:
                kind_, payload = await events.get()
                if kind_ == "tokens":
                    delta = text.feed(payload)
                    if delta:
                        yield sse(P.chunk(job, delta))
                elif kind_ == "done":
                    rest = text.finish()
                    if rest:
                        yield sse(P.chunk(job, rest))
                    yield sse(P.chunk(job, None if job.kind == "chat" else "", finished=payload.finished))
                    if job.include_usage:
                        yield sse(P.chunk(job, usage_of=(len(job.prompt_ids), len(payload.tokens))))
                    yield "data: [DONE]\n\n"
                    return
                else:
                    yield sse(P.RequestError(None, f"the request failed: {payload}", 500, "server_error").body())
                    yield "data: [DONE]\n\n"
                    return
        finally:  # a client that goes away cancels its row
            engine.cancel(req)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, "chat", "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, "completion", "/v1/completions")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "fluid",
                                            "max_model_len": limits.context}]}

    @app.get("/health")
    async def health():
        ok = engine.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped", "model": model_name,
                             "active_rows": engine.active_rows, "queue_depth": engine.queue_depth},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        return error(P.RequestError(None, f"no route {request.method} {request.url.path}", 404, "not_found"))

    @app.exception_handler(405)
    async def wrong_method(request: Request, exc):
        return error(P.RequestError(None, f"{request.method} is not allowed on {request.url.path}", 405))

    return app
