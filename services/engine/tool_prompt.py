"""A conversation with tools -> what the model's chat template is given.

A template that knows tools (it reads `tools`: Qwen2.5, Llama 3.1, Hermes, SmolLM3 ...) gets them as
transformers passes them, with earlier calls' arguments as objects, and decides the format itself. A
template without tool support (SmolLM2's) gets the Hermes convention written into the turns: the tool
signatures in the system turn, calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, results
as `<tool_response>` user turns. The gateway parses `<tool_call>` blocks out of the answer
(gateway/openai/tool_calls.py).
"""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.inference import ChatMessage, Tool, ToolCall

HERMES_SYSTEM = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def template_knows_tools(chat_template: Any) -> bool:
    return isinstance(chat_template, str) and "tools" in chat_template


def _tool_json(tool: Tool) -> dict[str, Any]:
    return msgspec.to_builtins(tool)  # type: ignore[no-any-return]


def _arguments(call: ToolCall) -> Any:
    try:
        return msgspec.json.decode(call.function.arguments)
    except msgspec.DecodeError:
        return call.function.arguments


def native(messages: list[ChatMessage], tools: list[Tool]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(conversation, tools) for a template that formats tools itself (transformers' chat-template shape)."""
    conversation = []
    for m in messages:
        turn: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            turn["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _arguments(c)}}
                for c in m.tool_calls
            ]
        if m.role == "tool":
            turn["tool_call_id"] = m.tool_call_id
            if m.name:
                turn["name"] = m.name
        conversation.append(turn)
    return conversation, ([_tool_json(t) for t in tools] or None)


def hermes(messages: list[ChatMessage], tools: list[Tool]) -> list[dict[str, Any]]:
    """The conversation with the Hermes tool convention written into plain turns (template without tools)."""
    conversation: list[dict[str, Any]] = []
    if tools:
        listing = "\n".join(msgspec.json.encode(_tool_json(t)).decode() for t in tools)
        system = HERMES_SYSTEM.format(tools=listing)
        if messages and messages[0].role == "system":
            system = messages[0].content + "\n\n" + system
            messages = messages[1:]
        conversation.append({"role": "system", "content": system})
    for m in messages:
        if m.role == "tool":
            conversation.append({"role": "user", "content": f"<tool_response>\n{m.content}\n</tool_response>"})
            continue
        content = m.content
        for c in m.tool_calls:
            call = msgspec.json.encode({"name": c.function.name, "arguments": _arguments(c)}).decode()
            content += ("\n" if content else "") + f"<tool_call>\n{call}\n</tool_call>"
        conversation.append({"role": m.role, "content": content})
    return conversation
