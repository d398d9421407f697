"""The OpenAI request bodies the server accepts, checked field by field, and its response shapes.

A request is decoded greedily; a field that would ask for something else (sampling, several
choices, log-probabilities, tools, penalties) is refused with a 400 naming the field, never
ignored. Fields the OpenAI API defines as pure bookkeeping (``user``, ``seed``, ``metadata``,
``store``) and fields it does not define are accepted and have no effect.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

SUPPORTED = ("greedy decoding only: temperature 0 or absent, top_p 1, n 1, no logprobs, tools, penalties "
             "or logit_bias")
MAX_STOP = 32   # OpenAI allows 4; lm-eval's local-completions sends a task's stop strings and EOS (5+)


class RequestError(Exception):
    """A bad request: HTTP ``status``, the OpenAI error ``type`` and the offending field."""

    def __init__(self, param: str | None, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(f"{param}: {message}" if param else message)
        self.param, self.status, self.kind = param, status, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}}


@dataclass
class Job:
    """What one request asks the engine for (after the checks below)."""

    kind: str                         # chat | completion
    model: str
    prompt_ids: list[int]
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False       # stream_options.include_usage
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(body: dict, key: str):
    v = body.get(key)
    if v is not None and not _is_num(v):
        raise RequestError(key, f"must be a number, got {type(v).__name__}")
    return v


def check_greedy(body: dict) -> None:
    """Refuse every field that asks for something other than one greedy choice."""
    t = _number(body, "temperature")
    if t is not None and t != 0:
        raise RequestError("temperature", f"{t} asks for sampling; this server decodes greedily ({SUPPORTED})")
    p = _number(body, "top_p")
    if p is not None and p != 1:
        raise RequestError("top_p", f"{p} asks for nucleus sampling ({SUPPORTED})")
    for key, neutral in (("n", 1), ("best_of", 1)):
        v = body.get(key)
        if v is not None and (not _is_int(v) or v != neutral):
            raise RequestError(key, f"must be {neutral} ({SUPPORTED}), got {v!r}")
    for key in ("presence_penalty", "frequency_penalty"):
        v = _number(body, key)
        if v:
            raise RequestError(key, f"{v} is not supported ({SUPPORTED})")
    for key in ("logprobs", "top_logprobs", "logit_bias", "tools", "tool_choice", "functions", "function_call",
                "echo", "suffix", "top_k", "min_p", "repetition_penalty"):
        v = body.get(key)
        neutral = v is None or v is False or v == {} or v == [] or v == "none" or (key == "top_k" and v in (-1, 0))
        if key == "repetition_penalty" and v == 1:
            neutral = True
        if not neutral:
            raise RequestError(key, f"{v!r} is not supported ({SUPPORTED})")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise RequestError("response_format", f"only {{'type': 'text'}} is supported, got {rf!r}")


def parse_stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError("stop", "must be a string or a list of strings")
    if len(stop) > MAX_STOP:
        raise RequestError("stop", f"at most {MAX_STOP} stop strings, got {len(stop)}")
    if any(not s for s in stop):
        raise RequestError("stop", "a stop string must not be empty")
    return stop


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise RequestError("messages", "is required")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        key = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(key, "must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant", "developer"):
            raise RequestError(f"{key}.role", f"must be system, user, assistant or developer, got {role!r}")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(f"{key}.content[{j}]", "only text parts ({'type': 'text', 'text': ...}) are supported")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise RequestError(f"{key}.content", f"must be a string, got {type(content).__name__}")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def parse_prompt(body: dict, vocab_size: int) -> str | list[int]:
    """``/v1/completions``'s ``prompt``: a string or token ids (one prompt a request)."""
    prompt = body.get("prompt")
    if prompt is None:
        raise RequestError("prompt", "is required")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt", "must not be empty")
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise RequestError("prompt", f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise RequestError("prompt", "one prompt per request (send several requests; they are batched together)")
    raise RequestError("prompt", "must be a non-empty string or a list of token ids")


def parse_max_tokens(body: dict, default: int | None, room: int, limit: int) -> int:
    """``max_tokens`` (or ``max_completion_tokens``): at least 1, within the context left after the
    prompt (``room``) and the server's ``limit``; absent: ``default`` (None: all the room), capped."""
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    v = body.get(key)
    if v is None:
        n = min(room, limit) if default is None else min(default, room, limit)
        if n < 1:
            raise RequestError("messages" if "messages" in body else "prompt", "leaves no room in the context to generate")
        return n
    if not _is_int(v):
        raise RequestError(key, f"must be an integer, got {type(v).__name__}")
    if v < 1:
        raise RequestError(key, f"must be at least 1, got {v}")
    if v > room:
        raise RequestError(key, f"{v} is more than the context leaves after the prompt ({room} tokens)")
    if v > limit:
        raise RequestError(key, f"{v} is more than this server's limit ({limit}; serve max_tokens=...)")
    return v


def parse_common(body: dict, served: str) -> tuple[str, bool, bool]:
    """model, stream, stream_options.include_usage."""
    model = body.get("model")
    if model is None:
        raise RequestError("model", f"is required (this server serves {served!r})")
    if not isinstance(model, str):
        raise RequestError("model", f"must be a string, got {type(model).__name__}")
    if model != served:
        raise RequestError("model", f"the model {model!r} does not exist (this server serves {served!r})", 404,
                           "model_not_found")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError("stream", f"must be a boolean, got {type(stream).__name__}")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise RequestError("stream_options", "must be an object")
        include_usage = opts.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise RequestError("stream_options.include_usage", "must be a boolean")
    check_greedy(body)
    return model, stream, include_usage


def finish_reason(finished: str) -> str:
    return "length" if finished == "max_new_tokens" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(job: Job, text: str, finished: str, n_tokens: int) -> dict:
    """The non-streamed body of a finished request."""
    if job.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason(finished)}
        obj, prefix = "chat.completion", "chatcmpl"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(finished)}
        obj, prefix = "text_completion", "cmpl"
    return {"id": f"{prefix}-{job.id}", "object": obj, "created": job.created, "model": job.model,
            "choices": [choice], "usage": usage(len(job.prompt_ids), n_tokens)}


def chunk(job: Job, text: str | None = None, finished: str | None = None, role: bool = False,
          usage_of: tuple[int, int] | None = None) -> dict:
    """One streamed chunk: a text delta, the opening role (chat), the finish, or the usage."""
    if job.kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finished and finish_reason(finished)}
        obj, prefix = "chat.completion.chunk", "chatcmpl"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finished and finish_reason(finished)}
        obj, prefix = "text_completion", "cmpl"
    out = {"id": f"{prefix}-{job.id}", "object": obj, "created": job.created, "model": job.model,
           "choices": [] if usage_of else [choice]}
    if usage_of:
        out["usage"] = usage(*usage_of)
    return out
