"""The inference API over MQTT: a generation request with its sampling parameters, and the reply.

A reply goes to the request's MQTT 5 response topic, or to ``reply_to`` for MQTT 3.1.1 clients.

``response_format`` constrains the answer (the shape of OpenAI's field, plus two extensions):

    {"type": "text"}                                   no constraint (the default)
    {"type": "json_object"}                            any JSON object
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}
    {"type": "regex", "regex": "..."}                  extension: the whole answer matches it
    {"type": "lark", "lark": "..."}                    extension: a Lark grammar (llguidance's dialect)

The kernel checks the shape; whether a schema, regex or grammar compiles is the agent's to say
(``bad_request`` naming ``response_format``), as only the agent holds the tokenizer it runs on.

Tools are OpenAI's: ``tools`` (functions with a JSON-schema ``parameters``), ``tool_choice``
(``none``, ``auto``, ``required`` or ``{"type": "function", "function": {"name": ...}}``), an
assistant message's ``tool_calls`` and ``tool`` messages answering them (``tool_call_id``). A reply
that calls a tool has ``finish_reason`` ``tool_calls`` and the call in ``tool_calls``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    Field,
    SerializerFunctionWrapHandler,
    Strict,
    StrictBool,
    StringConstraints,
    model_serializer,
    model_validator,
)

from edgeglm.contracts import Name
from edgeglm.errors import ProtocolError
from edgeglm.protocol.error_body import ErrorBody, ErrorCode
from edgeglm.protocol.message import _MAX_REASON, Message, _Body, _Count, _NonNeg
from edgeglm.protocol.topics import check_reply_topic

__all__ = [
    "ChatMessage",
    "FunctionCall",
    "FunctionSpec",
    "InferReply",
    "InferRequest",
    "JsonSchemaSpec",
    "NamedToolChoice",
    "ResponseFormat",
    "Timings",
    "TokenLogprob",
    "ToolCall",
    "ToolSpec",
    "TopLogprob",
    "Usage",
]

_MAX_PROMPT_CHARS = 65536
_TokenId = Annotated[int, Strict(), Field(ge=0, le=2**31 - 1)]
# Sampling knobs stay where float64 arithmetic cannot overflow (logits / temperature, logits /
# penalty): temperature 0 (greedy) or MIN_TEMPERATURE..2 as OpenAI has it; the penalty 0.1..10.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 2.0
MIN_PENALTY, MAX_PENALTY = 0.1, 10.0
MAX_TOP_LOGPROBS = 20  # OpenAI's bound


def _temperature(value: float) -> float:
    if value != 0 and not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        raise ValueError(f"0 (greedy) or between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}, not {value!r}")
    return value


_Temperature = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False), AfterValidator(_temperature)]
_Penalty = Annotated[float, Strict(), Field(ge=MIN_PENALTY, le=MAX_PENALTY, allow_inf_nan=False)]
# OpenAI's presence and frequency penalties: -2..2, subtracted from the logits of tokens already sampled.
_OpenAIPenalty = Annotated[float, Strict(), Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
_Pattern = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=_MAX_PROMPT_CHARS)]

# A JSON schema (a response format's, a tool's parameters) is compiled into a grammar on the
# request's path: its nesting and size are bounded here, checked without recursion, so a hostile
# schema is refused by name before any recursive code (json.dumps, the compiler) sees it.
MAX_SCHEMA_DEPTH = 64
MAX_SCHEMA_NODES = 8192


def _bounded_schema(schema: dict[str, Any]) -> dict[str, Any]:
    todo: list[tuple[Any, int]] = [(schema, 1)]
    nodes = 0
    while todo:
        node, depth = todo.pop()
        nodes += 1
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if nodes > MAX_SCHEMA_NODES:
            raise ValueError(f"has more than {MAX_SCHEMA_NODES} values")
        if isinstance(node, dict):
            todo.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            todo.extend((v, depth + 1) for v in node)
    return schema


_Schema = Annotated[dict[str, Any], Field(strict=True), AfterValidator(_bounded_schema)]


def _reply_topic_ok(topic: str) -> str:
    try:
        return check_reply_topic(topic)
    except ProtocolError as exc:
        raise ValueError(exc.why) from exc


_ReplyTopic = Annotated[str, StringConstraints(strict=True, max_length=1024), AfterValidator(_reply_topic_ok)]


_FunctionName = Annotated[str, StringConstraints(strict=True, pattern=r"^[A-Za-z0-9_-]{1,64}$")]
_CallId = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=128)]


class FunctionCall(_Body):
    name: _FunctionName
    arguments: Annotated[str, StringConstraints(strict=True, max_length=_MAX_PROMPT_CHARS)]  # JSON text


class ToolCall(_Body):
    id: _CallId
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionSpec(_Body):
    name: _FunctionName
    description: Annotated[str, StringConstraints(strict=True, max_length=4096)] | None = None
    parameters: _Schema | None = None  # a JSON schema
    strict: StrictBool | None = None  # the arguments always hold to ``parameters``


class ToolSpec(_Body):
    type: Literal["function"]
    function: FunctionSpec


class _NamedFunction(_Body):
    name: _FunctionName


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: _NamedFunction


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: Annotated[str, StringConstraints(strict=True, max_length=_MAX_PROMPT_CHARS)] = ""
    tool_calls: Annotated[tuple[ToolCall, ...], Field(min_length=1, max_length=16)] | None = None
    tool_call_id: _CallId | None = None

    @model_validator(mode="after")
    def _tool_fields(self) -> Self:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an 'assistant' message has 'tool_calls'")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("a 'tool' message, and only one, has 'tool_call_id'")
        return self


class JsonSchemaSpec(_Body):
    """OpenAI's ``json_schema`` object; ``schema`` is required here (OpenAI lets it out)."""

    name: Annotated[str, StringConstraints(strict=True, pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: Annotated[str, StringConstraints(strict=True, max_length=4096)] | None = None
    json_schema: Annotated[_Schema, Field(alias="schema")]
    strict: StrictBool | None = None  # llguidance always holds to the schema; accepted either way

    @model_serializer(mode="wrap")
    def _wire_names(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if "json_schema" in data:  # the attribute is named for pydantic's own ``schema``; the wire's
            data["schema"] = data.pop("json_schema")
        return data


class ResponseFormat(_Body):
    """What the answer must be (the module docstring has the forms); the field of ``type`` is required."""

    type: Literal["text", "json_object", "json_schema", "regex", "lark"]
    json_schema: JsonSchemaSpec | None = None
    regex: _Pattern | None = None
    lark: _Pattern | None = None

    @model_validator(mode="after")
    def _its_field(self) -> Self:
        for name in ("json_schema", "regex", "lark"):
            if (getattr(self, name) is not None) != (self.type == name):
                raise ValueError(f"'{name}' is given exactly when 'type' is {name!r}")
        return self


class InferRequest(Message):
    """A generation request: ``prompt`` or chat ``messages``, exactly one.

    MQTT 5 clients set the response topic and correlation data; MQTT 3.1.1 clients set
    ``reply_to`` and ``id`` instead. The agent checks the prompt against the context in tokens.
    """

    MAX_BYTES = 512 * 1024
    prompt: (
        Annotated[str, StringConstraints(strict=True, min_length=1, max_length=_MAX_PROMPT_CHARS)] | None
    ) = None
    messages: Annotated[tuple[ChatMessage, ...], Field(min_length=1, max_length=256)] | None = None
    model: Name | None = None
    max_tokens: Annotated[int, Strict(), Field(ge=1, le=8192)] = 128
    temperature: _Temperature = 0.0  # 0 = greedy
    top_k: Annotated[int, Strict(), Field(ge=0, le=1_000_000)] = 0  # 0 = off
    top_p: Annotated[float, Strict(), Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    repetition_penalty: _Penalty = 1.0
    stop: Annotated[
        tuple[Annotated[str, StringConstraints(strict=True, min_length=1, max_length=256)], ...],
        Field(max_length=16),
    ] = ()
    presence_penalty: _OpenAIPenalty = 0.0
    frequency_penalty: _OpenAIPenalty = 0.0
    seed: Annotated[int, Strict(), Field(ge=0, le=2**64 - 1)] | None = None
    stream: StrictBool = False
    response_format: ResponseFormat | None = None
    tools: Annotated[tuple[ToolSpec, ...], Field(min_length=1, max_length=64)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto
    logprobs: StrictBool = False  # the chosen tokens' log-probabilities in the reply
    top_logprobs: Annotated[int, Strict(), Field(ge=0, le=MAX_TOP_LOGPROBS)] = 0  # needs ``logprobs``
    id: Annotated[str, StringConstraints(strict=True, max_length=128)] | None = None
    reply_to: _ReplyTopic | None = None

    @model_validator(mode="after")
    def _one_input(self) -> Self:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of 'prompt' and 'messages' is required")
        if self.messages and sum(len(m.content) for m in self.messages) > _MAX_PROMPT_CHARS:
            raise ValueError(f"messages hold more than {_MAX_PROMPT_CHARS} characters")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        if self.tools is not None or self.tool_choice is not None:
            self._tools_ok()
        return self

    def _tools_ok(self) -> None:
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("'tools' name a function twice")
        if self.tool_choice not in (None, "none") and not names:
            raise ValueError("'tool_choice' needs 'tools'")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(
                f"'tool_choice' names {self.tool_choice.function.name!r}, which is not in 'tools'"
            )
        if self.messages is None and names:
            raise ValueError("'tools' need chat 'messages'")
        calls = self.tool_choice not in (None, "none")
        if calls and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("'response_format' and 'tool_choice' cannot both shape one answer")


class TopLogprob(_Body):
    token: _TokenId
    text: Annotated[str, StringConstraints(strict=True, max_length=1024)]
    # A token the model cannot pick (-inf) is reported as -9999.0, as OpenAI does: JSON has no -inf.
    logprob: Annotated[float, Strict(), Field(ge=-9999.0, le=0, allow_inf_nan=False)]


class TokenLogprob(TopLogprob):
    """One chosen token: its log-probability under the model, and the ``top`` alternatives."""

    top: Annotated[tuple[TopLogprob, ...], Field(max_length=MAX_TOP_LOGPROBS)] = ()


class Usage(_Body):
    prompt_tokens: _Count
    completion_tokens: _Count
    cached_tokens: _Count = 0  # of prompt_tokens: KV reused from an earlier prompt, not prefilled


class Timings(_Body):
    queue_ms: _NonNeg
    prefill_ms: _NonNeg
    decode_ms: _NonNeg
    total_ms: _NonNeg


class InferReply(Message):
    """A reply, or one part of a streamed reply (``seq`` counts from 0; the last has ``done``)."""

    MAX_BYTES = 1024 * 1024
    id: Annotated[str, StringConstraints(strict=True, max_length=128)] | None = None
    seq: _Count = 0
    text: Annotated[str, StringConstraints(strict=True, max_length=131072)] = ""
    tokens: Annotated[tuple[_TokenId, ...], Field(max_length=8192)] = ()
    done: StrictBool = False
    finish_reason: Literal["stop", "length", "tool_calls", "cancelled", "error"] | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    error: ErrorBody | None = None
    logprobs: Annotated[tuple[TokenLogprob, ...], Field(max_length=8192)] | None = None
    tool_calls: Annotated[tuple[ToolCall, ...], Field(min_length=1, max_length=16)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.done != (self.finish_reason is not None):
            raise ValueError("'finish_reason' is set exactly when 'done' is true")
        if (self.error is not None) != (self.finish_reason == "error"):
            raise ValueError("'error' is set exactly when 'finish_reason' is 'error'")
        return self

    @classmethod
    def failure(cls, code: ErrorCode, message: str, *, id: str | None = None) -> InferReply:
        """The final reply for a request that failed."""
        body = ErrorBody(code=code, message=message[:_MAX_REASON])
        return cls(id=id, done=True, finish_reason="error", error=body)
