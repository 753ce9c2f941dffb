"""Conversations rendered through the model's own chat template, and which of their tokens are trained.

OpenAI's rule: the loss falls on every assistant message of weight 1 (the default) and on nothing else; system,
user and tool messages, and assistant messages of weight 0, are context. The mask is built from the rendered
conversation itself, so it holds for templates with or without `{% generation %}` markers: the text of assistant
message i is what rendering messages[:i + 1] adds to rendering messages[:i] with the generation prompt, and the
conversation is tokenized segment by segment at those boundaries, the way a prompt and its generation are at
inference. Tool calls and `tools` go to the template as Hugging Face templates take them (arguments as objects,
`tools=`); a template that drops them, or one that does not render a conversation turn by turn (an earlier turn
re-rendered differently once a later one follows), is refused as the user's error, naming the field.

Rows arrive as `training.formats` normalises them: every message with every key (null where unset) and `tools` as
a JSON string, so that a split's rows share one Arrow schema.
"""

from __future__ import annotations

import json


class TemplateError(ValueError):
    """The model's chat template cannot render a row as asked; the message names the field."""


def clean(messages: list[dict]) -> list[dict]:
    """Messages as chat templates take them: unset keys gone, tool call arguments as objects, no weights."""
    out = []
    for message in messages:
        m = {k: v for k, v in message.items() if v is not None and k != "weight"}
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {**{k: v for k, v in c.items() if v is not None}, "function": _parsed(c["function"])}
                for c in m["tool_calls"]
            ]
        out.append(m)
    return out


def _parsed(function: dict) -> dict:
    arguments = function["arguments"]
    return {"name": function["name"], "arguments": json.loads(arguments) if isinstance(arguments, str) else arguments}


def tools_of(row: dict) -> list[dict] | None:
    tools = row.get("tools")
    return json.loads(tools) if isinstance(tools, str) else tools


def _render(tokenizer, messages: list[dict], tools, generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


def trained_spans(
    tokenizer, messages: list[dict], tools: list[dict] | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its trained assistant messages."""
    chat = clean(messages)
    full = _render(tokenizer, chat, tools)
    for tool in tools or []:
        if tool["function"]["name"] not in full:
            raise TemplateError(
                "tools: the model's chat template does not render tools; train without them or "
                "with a model whose template does"
            )
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight") == 0:
            continue
        before = _render(tokenizer, chat[:i], tools, generation_prompt=True)
        upto = _render(tokenizer, chat[: i + 1], tools)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise TemplateError(
                f"messages[{i}]: the model's chat template renders earlier turns differently once later ones follow, "
                "so the assistant's tokens cannot be told apart; use a template that renders turn by turn"
            )
        for j, call in enumerate(message.get("tool_calls") or []):
            if call["function"]["name"] not in upto[len(before) :]:
                raise TemplateError(
                    f"messages[{i}].tool_calls[{j}]: the model's chat template does not render tool calls"
                )
        spans.append((len(before), len(upto)))
    return full, spans


def tokenize(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, assistant_masks) of a conversation: 1 on the tokens of its weight-1 assistant messages."""
    full, spans = trained_spans(tokenizer, messages, tools)
    ids: list[int] = []
    mask: list[int] = []
    at = 0
    for start, end in [*spans, (len(full), len(full))]:
        for text, trained in ((full[at:start], 0), (full[start:end], 1)):
            if text:
                piece = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += piece
                mask += [trained] * len(piece)
        at = end
    return ids, mask
