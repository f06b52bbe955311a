"""What the model reads when a chat request carries tools: its own template's format when the template knows
tools, the Hermes convention written into the turns when it does not (the bundled SmolLM2)."""

from __future__ import annotations

from transformers import AutoTokenizer

from schemas.inference import ChatMessage, Tool, ToolCall, ToolCallFunction, ToolFunction
from services.engine import tool_prompt
from tests.helpers import real_model_dir

TOOLS = [Tool(function=ToolFunction(name="get_weather", description="Weather now", parameters={"type": "object"}))]
TURNS = [
    ChatMessage(role="user", content="Weather in Paris?"),
    ChatMessage(
        role="assistant",
        content="",
        tool_calls=[ToolCall(id="c1", function=ToolCallFunction(name="get_weather", arguments='{"city": "Paris"}'))],
    ),
    ChatMessage(role="tool", content='{"temperature": 21}', tool_call_id="c1"),
]
# A template that formats tools itself (the shape transformers documents: tools as JSON, calls as objects).
TOOL_TEMPLATE = (
    "{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}"
    "{% if m.tool_call_id %} (for {{ m.tool_call_id }}){% endif %}\n{% endfor %}"
)


def test_a_template_without_tool_support_gets_the_hermes_convention_in_its_turns() -> None:
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir())
    assert not tool_prompt.template_knows_tools(tokenizer.chat_template)
    text = tokenizer.apply_chat_template(tool_prompt.hermes(TURNS, TOOLS), tokenize=False, add_generation_prompt=True)
    assert '<tools>\n{"type":"function","function":{"name":"get_weather"' in text
    assert '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>' in text
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in text


def test_without_tools_the_turns_are_the_plain_conversation() -> None:
    plain = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi")]
    assert tool_prompt.hermes(plain, []) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]


def test_a_template_that_knows_tools_formats_them_and_gets_earlier_arguments_as_objects() -> None:
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir())
    assert tool_prompt.template_knows_tools(TOOL_TEMPLATE)
    conversation, tools = tool_prompt.native(TURNS, TOOLS)
    text = tokenizer.apply_chat_template(conversation, tools=tools, chat_template=TOOL_TEMPLATE, tokenize=False)
    assert text.startswith('TOOLS:[{"type": "function", "function": {"name": "get_weather"')
    assert 'CALL get_weather {"city": "Paris"}' in text
    assert '[tool]{"temperature": 21} (for c1)' in text
