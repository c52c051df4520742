"""What the server accepts: the request bodies as pydantic models (they are also the OpenAPI
schema), and errors in OpenAI's shape.

Every body forbids fields it does not know, so a field this server does not implement is a 400
that names it, never silently ignored. The few OpenAI fields that clients send with their
neutral value by habit (presence_penalty 0, frequency_penalty 0, best_of 1, logit_bias {},
logprobs false on chat) are accepted at exactly that value, and refused at any other.
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_N = 16              # choices per request
MAX_STOP = 4            # stop strings per request (OpenAI's limit)
MAX_LOGPROBS = 20       # top-N alternatives per token

# field -> the one value that changes nothing (None always means "not given")
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "best_of": 1, "logit_bias": {},
           "logprobs": False, "parallel_tool_calls": True}


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code, self.headers = type, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_neutral(cls, data):
        """Drop a not-implemented field given at its neutral value (or null); any other value
        stays, and extra="forbid" then names it."""
        if isinstance(data, dict):
            data = {k: v for k, v in data.items()
                    if not (k not in cls.model_fields and k in NEUTRAL and _neutral(k, v))}
        return data


def _neutral(field, value) -> bool:
    want = NEUTRAL[field]
    if value is None or isinstance(want, bool):
        return value is None or value is want
    if isinstance(want, (int, float)):                    # 0 and 0.0 alike, never False
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == want
    return value == want


class StreamOptions(_Body):
    include_usage: bool = False


Stop = Union[str, list[str], None]


class _Sampling(_Body):
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="extension: sample from the k likeliest "
                              "tokens only (0 = all)")
    stop: Stop = Field(None, description=f"up to {MAX_STOP} strings; the text ends before the "
                       "first of them, which is not returned")
    seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(None, ge=0, description="default 16; 0 with echo scores "
                                   "the prompt")
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: str | None = Field(None, description="the speaker's name in the transcript "
                             "(default: the server's name for this role)")


class ChatRequest(_Sampling):
    messages: list[Message] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


def validation_error(errors) -> APIError:
    """pydantic's first error as one 400: the message says which field and what is wrong."""
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    kind = e.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])})")
    if kind == "extra_forbidden":
        field = ".".join(loc)
        return APIError(400, f"unsupported field '{field}': this server does not implement it; "
                        "remove it from the request", param=field, code="unsupported_field")
    # a union's member names (e.g. 'str', 'list[int]') are not fields: keep the field path
    path = [p for p in loc if not (p.startswith(("str", "list[", "int", "bool", "float"))
                                   or p.startswith("function-"))]
    field = ".".join(path) or None
    if kind == "missing":
        return APIError(400, f"'{field}' is required", param=field, code="missing_field")
    if not path and kind in ("model_type", "dict_type"):
        return APIError(400, "the request body must be a JSON object")
    return APIError(400, f"'{field}': {e['msg']}" if field else e["msg"], param=field,
                    code="invalid_value")
