"""OpenAI's chat fine-tuning format whole (`training.formats`), rendered through the model's own template with the
tokens of weight-1 assistant messages, and only those, trained (`training.chat`)."""

import json

import pytest

from training.chat import TemplateError, tokenize
from training.formats import check_lines
from training.tiny import build_tokenizer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]


def call(name: str, arguments: dict, call_id: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


CONVERSATION = {
    "messages": [
        {"role": "system", "content": "You help travellers."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Weather and time "}, {"type": "text", "text": "in Paris?"}],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call("get_weather", {"city": "Paris"}, "c1"), call("get_time", {}, "c2")],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "noon"},
        {"role": "assistant", "content": "Sunny, at noon.", "weight": 1},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "Bye.", "weight": 0},
    ],
    "tools": TOOLS,
    "parallel_tool_calls": True,
}


def checked(*rows):
    return check_lines([json.dumps(r).encode() for r in rows], "sft")


def test_the_weight_1_assistant_tokens_and_only_they_are_trained():
    """Worked by hand on the tiny model's template (tools in a system turn, calls as `<tool_call>{json}</tool_call>`,
    as Qwen 2.5's): the trained tokens decode to the two calls of message 2 with their end-of-turn, then message 5
    with its end-of-turn; the weight-0 "Bye." and every system, user and tool token are context."""
    report, [row] = checked(CONVERSATION)
    assert report.ok and (report.tool_examples, report.untrained_messages) == (1, 1)
    tokenizer = build_tokenizer()
    ids, mask = tokenize(tokenizer, row["messages"], json.loads(row["tools"]))
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    calls = (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call><|end|>\n'
    )
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tokenizer.decode(trained) == calls + "Sunny, at noon.<|end|>\n"
    # token by token: the trained runs are exactly the tokens of those two texts, in place
    runs, run = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    assert runs == [
        tokenizer(calls, add_special_tokens=False)["input_ids"],
        tokenizer("Sunny, at noon.<|end|>\n", add_special_tokens=False)["input_ids"],
    ]
    whole = tokenizer.decode(ids)
    assert (
        whole.startswith("<|system|>\n# Tools\n")
        and "<|tool|>\nsunny<|end|>" in whole
        and whole.endswith("Bye.<|end|>\n")
    )


def test_a_template_that_drops_tools_or_calls_is_refused_naming_the_field():
    _, [row] = checked(CONVERSATION)
    plain = build_tokenizer()
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(TemplateError, match="^tools: the model's chat template does not render tools"):
        tokenize(plain, row["messages"], json.loads(row["tools"]))
    with pytest.raises(TemplateError, match=r"^messages\[2\].tool_calls\[0\]: .* does not render tool calls"):
        tokenize(plain, row["messages"], None)


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        (
            lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="{city: Paris}"),
            "messages[2].tool_calls[0].function.arguments",
            "not valid JSON",
        ),
        (
            lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="[1]"),
            "messages[2].tool_calls[0].function.arguments",
            "expected a JSON object, got array",
        ),
        (
            lambda r: r["messages"][2]["tool_calls"][1]["function"].update(name="get_date"),
            "messages[2].tool_calls[1].function.name",
            "'get_date' is not one of the row's tools",
        ),
        (lambda r: r.update(parallel_tool_calls=False), "messages[2].tool_calls", "2 calls in one message"),
        (lambda r: r["messages"][5].update(weight=2), "messages[5].weight", "expected 0 or 1"),
        (lambda r: r["messages"][1].update(weight=1), "messages[1].weight", "only an assistant message has a weight"),
        (
            lambda r: r["messages"][1].update(content=[{"type": "image_url", "image_url": {"url": "x"}}]),
            "messages[1].content[0]",
            "image content parts are not supported",
        ),
        (lambda r: r["messages"][5].update(weight=0), "messages", "every assistant message has weight 0"),
        (
            lambda r: r["messages"][3].update(tool_calls=[call("get_time", {}, "c3")]),
            "messages[3].tool_calls",
            "only an assistant message makes tool calls",
        ),
        (
            lambda r: r.update(tools=[{"type": "function", "function": {"name": ""}}]),
            "tools[0].function.name",
            "expected a non-empty string",
        ),
    ],
)
def test_a_bad_conversation_names_the_line_and_the_field(change, field, reason):
    row = json.loads(json.dumps(CONVERSATION))
    if field == "messages":
        row["messages"][2]["weight"] = 0
    change(row)
    report, rows = checked({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}, row)
    assert len(rows) == 1, "the good line is kept, the bad one is not"
    [problem] = report.errors
    assert (problem.line, problem.field) == (2, field) and problem.reason.startswith(reason), problem
