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
    if not tokenizer.chat_template:
        raise TemplateError(
            "messages: the model has no chat template, so conversations cannot be rendered; "
            "give prompt and completion text, or use a model whose tokenizer has a template"
        )
    from jinja2 import TemplateError as JinjaError

    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
        )
    except JinjaError as exc:  # the template's own refusal (`raise_exception`), in its words
        raise TemplateError(f"messages: the model's chat template refuses this conversation: {exc}") from None


def _turn_end(tokenizer, full: str, before: str, upto: str, message: dict) -> int | None:
    """Where in `full` the assistant turn that follows `before` ends; `upto` renders the conversation up to that turn.

    Most templates render a turn the same whether or not others follow, and the turn ends at `len(upto)`. Some render
    the last turn with more: text before the answer (Qwen 3's empty think block) or after it (Phi-3's end-of-text
    token). Then the turn in `full` is the longest run of the same tokens as the last-turn rendering after dropping
    the fewest of its first tokens, and it must hold the message's content and calls. None where neither holds."""
    if not (upto.startswith(before) and full.startswith(before)):
        return None
    if full.startswith(upto):
        return len(upto)
    start = len(before)
    mine = tokenizer(upto[start:], add_special_tokens=False)["input_ids"]
    rest = tokenizer(full[start:], add_special_tokens=False, return_offsets_mapping=True)
    theirs, offsets = rest["input_ids"], rest["offset_mapping"]
    wanted = [message["content"]] if isinstance(message.get("content"), str) and message["content"] else []
    wanted += [c["function"]["name"] for c in message.get("tool_calls") or []]
    for skip in range(len(mine)):
        n = 0
        while skip + n < len(mine) and n < len(theirs) and mine[skip + n] == theirs[n]:
            n += 1
        if n and all(w in full[start : start + offsets[n - 1][1]] for w in wanted):
            return start + offsets[n - 1][1]
    return None


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
        for j, call in enumerate(message.get("tool_calls") or []):
            if call["function"]["name"] not in upto[len(before) :]:
                raise TemplateError(
                    f"messages[{i}].tool_calls[{j}]: the model's chat template does not render tool calls"
                )
        end = _turn_end(tokenizer, full, before, upto, message)
        if end is None:
            raise TemplateError(
                f"messages[{i}]: the model's chat template renders earlier turns differently once later ones follow, "
                "so the assistant's tokens cannot be told apart; use a template that renders turn by turn"
            )
        spans.append((len(before), end))
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
