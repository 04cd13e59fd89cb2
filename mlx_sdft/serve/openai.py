"""The OpenAI chat-completions protocol: request bodies checked into `ChatRequest`, and the
response, chunk, model-list and error shapes (https://platform.openai.com/docs/api-reference/chat).
No MLX and no sockets here."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from mlx_sdft.core.data import check_messages
from mlx_sdft.errors import InputError


SEED_MAX = 2**64 - 1  # the largest seed mx.random.seed takes


class BadRequest(Exception):
    """Answered with `status` and an OpenAI error object; nothing is stored."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        kind: str = "invalid_request_error",
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict]  # content always a string (text parts joined)
    tools: list | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]  # the answer ends before the first of these (finish_reason "stop")
    stream: bool
    include_usage: bool  # stream_options.include_usage: one more chunk with the usage

    def sampling(self) -> dict:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "stop": list(self.stop),
        }


def parse_chat(body: Any, max_tokens: int, temperature: float, top_p: float) -> ChatRequest:
    """Check a /v1/chat/completions body; the other arguments are the server's defaults."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    messages = body.get("messages")
    if isinstance(messages, list):
        messages = [_text_only(m, i) for i, m in enumerate(messages)]
    try:
        messages = check_messages(messages, "messages", "request")
    except InputError as e:
        raise BadRequest(str(e), param="messages") from None
    tools = body.get("tools")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
    ):
        raise BadRequest("tools must be a list of objects", param="tools")
    if body.get("n") not in (None, 1):  # null is "not given", as OpenAI reads it
        raise BadRequest("n: only 1 completion per request", param="n")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    request = ChatRequest(
        messages=messages,
        tools=tools or None,
        max_tokens=_number(limit, max_tokens, "max_tokens", int, 1, None),
        temperature=_number(body.get("temperature"), temperature, "temperature", float, 0.0, 2.0),
        top_p=_number(body.get("top_p"), top_p, "top_p", float, 0.0, 1.0),
        seed=body.get("seed")
        if body.get("seed") is None
        else _number(body.get("seed"), 0, "seed", int, 0, SEED_MAX),
        stop=_stop(body.get("stop")),
        stream=_flag(body.get("stream"), "stream"),
        include_usage=_flag(
            _object(body.get("stream_options"), "stream_options").get("include_usage"),
            "stream_options.include_usage",
        ),
    )
    if request.top_p == 0:
        raise BadRequest("top_p must be > 0", param="top_p")
    return request


def _text_only(message: Any, i: int) -> Any:
    """Content given as a list of parts becomes one string: text parts only (no images here)."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message
    parts = message["content"]
    if not all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in parts
    ):
        raise BadRequest(f"messages[{i}].content: only text parts are supported", param="messages")
    return {**message, "content": "".join(p["text"] for p in parts)}


def _number(value: Any, default, name: str, kind: type, low: float, high: float | None):
    if value is None:
        return default
    # Python's JSON reads NaN, Infinity and 1e400 (= inf) as floats: none is a setting
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or (kind is int and value != int(value))
    ):
        raise BadRequest(
            f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}",
            param=name,
        )
    if value < low or (high is not None and value > high):
        raise BadRequest(
            f"{name} must be in [{low}, {high if high is not None else 'inf'}], got {value!r}",
            param=name,
        )
    return kind(value)


def _stop(value: Any) -> tuple[str, ...]:
    """`stop`: null, a string or a list of up to 4 non-empty strings (OpenAI's limit)."""
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not (
        isinstance(stops, list) and len(stops) <= 4 and all(isinstance(x, str) and x for x in stops)
    ):
        raise BadRequest(
            f"stop must be a non-empty string or a list of up to 4 of them, got {value!r}",
            param="stop",
        )
    return tuple(stops)


def _object(value: Any, name: str) -> dict:
    if value is not None and not isinstance(value, dict):
        raise BadRequest(f"{name} must be an object, got {value!r}", param=name)
    return value or {}


def _flag(value: Any, name: str) -> bool:
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false, got {value!r}", param=name)
    return bool(value)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    id: str,
    model: str,
    answer: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    fingerprint: str,
) -> dict:
    """The whole answer (stream: false). `system_fingerprint` names the adapter version and the rules
    that answered ("adapters-v3", "adapters-v3-rules-1a2b3c4d")."""
    return {
        "id": id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(
    id: str,
    model: str,
    fingerprint: str,
    delta: dict | None,
    finish_reason: str | None = None,
    usage_: dict | None = None,
) -> dict:
    """One server-sent event of a streamed answer; `delta` None gives the usage-only chunk (no choices)."""
    body = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage_ is not None:
        body["usage"] = usage_
    return body


def models(model: str, version: int) -> dict:
    return {
        "object": "list",
        "data": [
            {
                "id": model,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "mlx-sdft",
                "adapter_version": version,
            }
        ],
    }


def error(message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
