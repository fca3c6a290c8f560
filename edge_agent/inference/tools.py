"""Tool calling in GLM's own format: how tools and calls are written into the prompt, the grammar a
forced call is held to, and how an answer is read back as a call.

GLM-4 (and GLM-Edge, trained on its format) sees the available functions in a system message:

    <|system|>
    你是一个名为 ChatGLM 的人工智能助手。...

    # 可用工具

    ## close_valve

    {function as JSON, indent 4}
    在调用上述函数时，请使用 Json 格式表示调用的参数。

and calls one by answering its name on the first line and the arguments as JSON on the next
(``<|assistant|>close_valve\\n{"valve": "V-3"}``); the tool's result comes back as an
``<|observation|>`` turn, and the model answers on. Here, an OpenAI assistant message with
``tool_calls`` is written as that name-and-arguments content, a ``tool`` message as an
``observation`` turn, and the whole chat goes through the bundle's own template.

``tool_choice``: ``none`` writes no tools and never reads a call; ``auto`` writes them and reads a
call back when the answer has that shape (its arguments are not constrained: the model may answer
text instead); ``required`` and a named function constrain the answer to a call, the arguments to
the function's ``parameters`` schema (a Lark grammar with llguidance's ``%json``).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from typing import Any

from edgeglm.protocol import ChatMessage, FunctionCall, InferRequest, NamedToolChoice, ToolCall, ToolSpec

__all__ = ["ToolPlan", "plan"]

_SYSTEM = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
)
_AFTER = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
_COMPACT = {"whitespace_flexible": False}  # see constraint.py: a small model and free whitespace


class ToolPlan:
    """What a request's tools do to its prompt, its constraint and its answer."""

    def __init__(self, tools: Sequence[ToolSpec], choice: str | NamedToolChoice) -> None:
        self.tools = {t.function.name: t for t in tools}
        self.choice = choice

    @property
    def forced(self) -> list[ToolSpec]:
        """The tools the answer must call one of (none for ``auto``)."""
        if isinstance(self.choice, NamedToolChoice):
            return [self.tools[self.choice.function.name]]
        return list(self.tools.values()) if self.choice == "required" else []

    def lark(self) -> str | None:
        """The grammar of a forced call: one of the names, a newline, arguments in its schema."""
        forced = self.forced
        if not forced:
            return None
        calls = []
        for tool in forced:
            schema = dict(tool.function.parameters or {"type": "object"})
            schema.setdefault("x-guidance", _COMPACT)
            calls.append(f"{json.dumps(tool.function.name + chr(10))} %json {json.dumps(schema)}")
        return "start: " + " | ".join(calls)

    def read(self, text: str) -> tuple[ToolCall, ...] | None:
        """The call ``text`` makes (``name\\n{arguments}``), or None when it is an answer."""
        name, _, arguments = text.strip().partition("\n")
        if name.strip() not in self.tools:
            return None
        try:
            if not isinstance(json.loads(arguments), dict):
                return None
        except ValueError:
            return None
        call = FunctionCall(name=name.strip(), arguments=arguments.strip())
        return (ToolCall(id=f"call_{secrets.token_hex(12)}", function=call),)


def plan(request: InferRequest) -> ToolPlan | None:
    """The request's tool plan; None when it has no tools or ``tool_choice`` is ``none``."""
    if not request.tools or request.tool_choice == "none":
        return None
    return ToolPlan(request.tools, request.tool_choice or "auto")


def render(messages: Sequence[ChatMessage], tools: ToolPlan | None) -> list[dict[str, Any]]:
    """The chat as the template takes it: tools in GLM's system message, calls and results as GLM
    writes them."""
    out: list[dict[str, Any]] = []
    if tools is not None:
        text = _SYSTEM
        for tool in tools.tools.values():
            spec = tool.function.model_dump(exclude_none=True)
            text += f"\n\n## {tool.function.name}\n\n{json.dumps(spec, ensure_ascii=False, indent=4)}{_AFTER}"
        out.append({"role": "system", "content": text})
    for m in messages:
        if m.role == "tool":
            out.append({"role": "observation", "content": m.content})
        elif m.tool_calls:
            calls = "\n".join(f"{c.function.name}\n{c.function.arguments}" for c in m.tool_calls)
            out.append({"role": "assistant", "content": (m.content + "\n" if m.content else "") + calls})
        else:
            out.append({"role": m.role, "content": m.content})
    return out
