"""The wire schema of ``potstill serve``: the request bodies it takes (pydantic), the fields it
refuses rather than ignores, and its errors in OpenAI's shape."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_TOP_LOGPROBS = 20
# request fields this server cannot honour, with the value that means "not used"
UNSUPPORTED = {"tools": None, "functions": None, "function_call": None, "logit_bias": None,
               "presence_penalty": 0, "frequency_penalty": 0, "best_of": 1, "suffix": None,
               "response_format": {"type": "text"}, "tool_choice": None, "parallel_tool_calls": None,
               # vLLM sampling options
               "top_k": -1, "min_p": 0, "repetition_penalty": 1, "min_tokens": 0, "ignore_eos": False,
               "stop_token_ids": None}


class APIError(Exception):
    """A request the server refuses, sent as OpenAI's error JSON with ``status``."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error JSON: a status under 500 is the request's fault, 500 and over the server's."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Sampling(BaseModel):
    """What both endpoints take. Unknown fields are accepted, as OpenAI clients send extras; a null
    means the default, as in OpenAI's API (the official client sends null for None)."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(1.0, gt=0, le=1)
    n: int | None = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: dict | None = None
    return_tokens_as_token_ids: bool | None = False  # vLLM: token strings are "token_id:{id}"

    @model_validator(mode="after")
    def _nulls_are_defaults(self):
        for name in ("temperature", "top_p", "n", "stream", "return_tokens_as_token_ids", "logprobs", "echo"):
            if name in type(self).model_fields and getattr(self, name) is None:
                setattr(self, name, type(self).model_fields[name].default)
        return self


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]  # tool turns are not supported
    content: str | list[dict] | None = None

    @model_validator(mode="after")
    def _no_tool_calls(self):
        if (self.model_extra or {}).get("tool_calls") or (self.model_extra or {}).get("function_call"):
            raise ValueError("messages with tool calls are not supported")
        return self


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = False
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # vLLM


def validated(schema: type[Sampling], data: dict) -> Sampling:
    """``data`` (a parsed body) as ``schema``, or an APIError saying what is wrong, where."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise APIError(*validation_message(e.errors(include_url=False, include_input=False))) from None


def validation_message(problems: list[dict]) -> tuple[str, str | None]:
    """pydantic's validation errors as one line and the top-level field at fault (OpenAI's ``param``:
    a string or null). A field that may take several types (a completion's prompt, a message's
    content) fails once per type: that is said once, with the types."""
    first = problems[0]
    loc = first["loc"]
    field = loc[0] if loc and isinstance(loc[0], str) else None
    same = [p["loc"] for p in problems if p["loc"][:1] == loc[:1]]
    n = next(i for i in range(len(loc) + 1) if i == len(loc) or any(len(l) <= i or l[i] != loc[i] for l in same))
    if len(same) > 1 and all(len(l) > n and isinstance(l[n], str) and is_type_tag(l[n]) for l in same):
        where = ".".join(map(str, loc[:n]))
        return f"{where}: expected {' or '.join(dict.fromkeys(l[n] for l in same))}", field
    return f"{'.'.join(map(str, loc)) or 'body'}: {first['msg']}", field


def is_type_tag(name: str) -> bool:
    """Whether a validation error's location step names a union member (``list[int]``), not a field."""
    return "[" in name or name in ("str", "int", "float", "bool", "dict", "list", "none")
