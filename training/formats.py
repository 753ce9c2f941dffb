"""Training data formats: detect, validate and normalise JSONL, line by line. Torch-free.

Accepted forms, one JSON object per line:

| format | method | fields |
| --- | --- | --- |
| `dpo_pairs` | dpo | `prompt`, `chosen`, `rejected`: strings |
| `dpo_conversational` | dpo | `prompt`, `chosen`, `rejected`: message lists (`prompt` may be left out: then it is the shared start of `chosen` and `rejected`) |
| `openai_dpo` | dpo | `input.messages`, `preferred_output`, `non_preferred_output`: message lists |
| `hh_rlhf` | dpo | `chosen`, `rejected`: whole `\\n\\nHuman:` / `\\n\\nAssistant:` transcripts |
| `sft_prompt_completion` | sft | `prompt`, `completion`: strings, or message lists |
| `sft_messages` | sft | `messages`: a message list with at least one assistant turn, OpenAI's chat form whole: `tools`, assistant `tool_calls`, `tool` results, `name`, `weight` (0 or 1), `parallel_tool_calls` |
| `sft_text` | sft | `text`: a string |
| `kto_unpaired` | kto | `prompt`, `completion`: strings, or message lists; `label`: true (desirable) or false |

A message is `{"role": "system"|"user"|"assistant"|"developer"|"tool", "content": string}`. In `sft_messages` it may
also carry `name`, and: an assistant message `tool_calls` (`[{"id", "type": "function", "function": {"name",
"arguments": a JSON object as a string}}]`, its `content` then may be null) and `weight` (1: trained, 0: context
only); a `tool` message `tool_call_id`. `content` may be a list of text parts; image parts are refused (no vision
model yet). The row may carry `tools` (`[{"type": "function", "function": {"name", "description", "parameters"}}]`),
which every tool call must name, and `parallel_tool_calls`.

Normalised rows are what TRL reads: DPO `{"prompt", "chosen", "rejected"}` (strings, or message lists
for the conversational forms), SFT `{"prompt", "completion"}`, `{"messages"}` (each message with every key of
`CHAT_KEYS`, null where unset, a tool call's `arguments` kept as a JSON string, and `tools` as a JSON string, so
that rows share one Arrow schema; `training.chat` renders them) or `{"text"}`, KTO `{"prompt", "completion",
"label"}`.
A bad file yields a report (line, field, reason), never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from training.fingerprints import Fingerprints

MAX_LISTED = 50  # errors and warnings listed in a report; all are counted
ROLES = ("system", "user", "assistant", "developer", "tool")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"

FORMAT_METHOD = {
    "dpo_pairs": "dpo",
    "dpo_conversational": "dpo",
    "openai_dpo": "dpo",
    "hh_rlhf": "dpo",
    "sft_prompt_completion": "sft",
    "sft_messages": "sft",
    "sft_text": "sft",
    "kto_unpaired": "kto",
    "rft_messages": "rft",
    "rft_prompt": "rft",
}
# What a reinforcement row's prompt is; every other field of the row is the `item` its grader reads.
RFT_PROMPT_FIELDS = ("messages", "prompt")


@dataclass(frozen=True)
class Limits:
    """What one data file may hold; beyond a limit, the line (or the file) is an error that names it."""

    max_rows: int = 10_000_000
    max_line_bytes: int = 8 << 20
    max_json_depth: int = 32


@dataclass(frozen=True)
class LongLine:
    """A line longer than the limit, skipped without being held in memory."""

    length: int


class DataError(ValueError):
    """A data file that cannot be trained on; carries its report."""

    def __init__(self, report: Report, source: str = "the data"):
        self.report = report
        first = report.errors[0] if report.errors else None
        where = f" (line {first.line}, {first.field}: {first.reason})" if first else ""
        super().__init__(f"{report.error_count} error(s) in {source}{where}")


@dataclass
class Problem:
    line: int
    field: str
    reason: str


@dataclass
class Report:
    rows: int = 0
    format: str | None = None
    method: str | None = None
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    error_count: int = 0
    warning_count: int = 0
    token_lengths: dict | None = None  # filled by training.data.token_length_stats
    tool_examples: int = 0  # conversations with tools or tool calls
    untrained_messages: int = 0  # assistant messages of weight 0: context, not trained

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    def error(self, line: int, fld: str, reason: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_LISTED:
            self.errors.append(Problem(line, fld, reason))

    def warn(self, line: int, fld: str, reason: str) -> None:
        self.warning_count += 1
        if len(self.warnings) < MAX_LISTED:
            self.warnings.append(Problem(line, fld, reason))

    def to_dict(self) -> dict:
        return asdict(self)


class _RowError(Exception):
    def __init__(self, fld: str, reason: str):
        self.field, self.reason = fld, reason


def _type_name(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _string(row: dict, key: str, *, empty_ok: bool = False) -> str:
    if key not in row:
        raise _RowError(key, "missing")
    value = row[key]
    if not isinstance(value, str):
        raise _RowError(key, f"expected a string, got {_type_name(value)}")
    if not value.strip() and not empty_ok:
        raise _RowError(key, "empty string")
    return value


NO_TOOLS_IN_PAIRS = "tools and tool calls in preference pairs are not supported yet"


def _messages(value: object, path: str, *, need_assistant: bool = False) -> list[dict]:
    if not isinstance(value, list):
        raise _RowError(path, f"expected a list of messages, got {_type_name(value)}")
    if not value:
        raise _RowError(path, "empty list of messages")
    out = []
    for i, msg in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(msg, dict):
            raise _RowError(where, f"expected a message object, got {_type_name(msg)}")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise _RowError(f"{where}.role", f"expected one of {', '.join(ROLES)}, got {json.dumps(role)}")
        for key in ("tool_calls", "tool_call_id"):
            if msg.get(key) is not None:
                raise _RowError(f"{where}.{key}", f"{NO_TOOLS_IN_PAIRS} (SFT's messages take them)")
        if not isinstance(content, str):
            raise _RowError(f"{where}.content", f"expected a string, got {_type_name(content)}")
        if not content.strip() and role == "assistant":
            raise _RowError(f"{where}.content", "empty string")
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise _RowError(path, "no assistant message to learn from")
    return out


CHAT_KEYS = ("role", "content", "name", "weight", "tool_calls", "tool_call_id")


def _text_content(value: object, where: str) -> str:
    """A message's content: a string, or OpenAI's list of text parts (joined)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _RowError(where, f"expected a string or a list of content parts, got {_type_name(value)}")
    texts = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("image_url", "input_image", "image"):
            raise _RowError(f"{where}[{i}]", "image content parts are not supported (no vision model yet)")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise _RowError(f"{where}[{i}]", 'expected a text part, {"type": "text", "text": string}')
        texts.append(part["text"])
    return "".join(texts)


def _tool_calls(value: object, where: str, tools: set[str] | None) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _RowError(where, f"expected a non-empty list of tool calls, got {_type_name(value)}")
    calls = []
    for i, call in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(call, dict):
            raise _RowError(at, f"expected a tool call object, got {_type_name(call)}")
        if call.get("type", "function") != "function":
            raise _RowError(f"{at}.type", f"expected 'function', got {json.dumps(call.get('type'))}")
        function = call.get("function")
        if not isinstance(function, dict):
            raise _RowError(f"{at}.function", "missing" if function is None else "expected an object")
        name, arguments = function.get("name"), function.get("arguments")
        if not isinstance(name, str) or not name:
            raise _RowError(f"{at}.function.name", "expected a non-empty string")
        if tools is not None and name not in tools:
            raise _RowError(
                f"{at}.function.name", f"{name!r} is not one of the row's tools ({', '.join(sorted(tools))})"
            )
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
            except json.JSONDecodeError as exc:
                raise _RowError(
                    f"{at}.function.arguments", f"not valid JSON: {exc.msg} at column {exc.colno}"
                ) from None
        else:
            parsed = arguments
        if not isinstance(parsed, dict):
            raise _RowError(f"{at}.function.arguments", f"expected a JSON object, got {_type_name(parsed)}")
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise _RowError(f"{at}.id", f"expected a string, got {_type_name(call_id)}")
        calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(parsed)}})
    return calls


def _tools(value: object) -> list[dict]:
    if not isinstance(value, list):
        raise _RowError("tools", f"expected a list of tools, got {_type_name(value)}")
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type", "function") != "function":
            raise _RowError(f"tools[{i}]", 'expected {"type": "function", "function": {"name", ...}}')
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise _RowError(f"tools[{i}].function.name", "expected a non-empty string")
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise _RowError(f"tools[{i}].function.parameters", "expected a JSON schema object")
    return value


def _chat(row: dict) -> dict:
    """An `sft_messages` row in OpenAI's chat form, checked, every message with every key of `CHAT_KEYS`."""
    tools = _tools(row["tools"]) if row.get("tools") is not None else None
    if "parallel_tool_calls" in row and not isinstance(row["parallel_tool_calls"], bool):
        raise _RowError("parallel_tool_calls", f"expected true or false, got {_type_name(row['parallel_tool_calls'])}")
    value = row["messages"]
    if not isinstance(value, list):
        raise _RowError("messages", f"expected a list of messages, got {_type_name(value)}")
    if not value:
        raise _RowError("messages", "empty list of messages")
    names = {t["function"]["name"] for t in tools} if tools is not None else None
    out = []
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _RowError(where, f"expected a message object, got {_type_name(msg)}")
        role = msg.get("role")
        if role not in ROLES:
            raise _RowError(f"{where}.role", f"expected one of {', '.join(ROLES)}, got {json.dumps(role)}")
        calls = None
        if msg.get("tool_calls") is not None:
            if role != "assistant":
                raise _RowError(f"{where}.tool_calls", "only an assistant message makes tool calls")
            calls = _tool_calls(msg["tool_calls"], f"{where}.tool_calls", names)
            if len(calls) > 1 and row.get("parallel_tool_calls") is False:
                raise _RowError(
                    f"{where}.tool_calls", f"{len(calls)} calls in one message, but parallel_tool_calls is false"
                )
        content = msg.get("content")
        if content is None and calls is None:
            raise _RowError(f"{where}.content", "missing (only an assistant message with tool_calls may leave it out)")
        content = None if content is None else _text_content(content, f"{where}.content")
        if role == "assistant" and calls is None and not content.strip():
            raise _RowError(f"{where}.content", "empty string")
        weight = msg.get("weight")
        if weight is not None and (role != "assistant" or weight not in (0, 1) or isinstance(weight, bool)):
            reason = "only an assistant message has a weight" if role != "assistant" else "expected 0 or 1"
            raise _RowError(f"{where}.weight", reason)
        for key in ("name", "tool_call_id"):
            if msg.get(key) is not None and not isinstance(msg[key], str):
                raise _RowError(f"{where}.{key}", f"expected a string, got {_type_name(msg[key])}")
        unknown = set(msg) - set(CHAT_KEYS) - {"refusal", "function_call"}
        if unknown:
            raise _RowError(f"{where}.{sorted(unknown)[0]}", "unknown message field")
        out.append(
            {
                "role": role,
                "content": content,
                "name": msg.get("name"),
                "weight": None if weight is None else int(weight),
                "tool_calls": calls,
                "tool_call_id": msg.get("tool_call_id"),
            }
        )
    if not any(m["role"] == "assistant" and m["weight"] != 0 for m in out):
        weighted = any(m["role"] == "assistant" for m in out)
        raise _RowError(
            "messages",
            "every assistant message has weight 0: nothing to learn from"
            if weighted
            else "no assistant message to learn from",
        )
    return {"messages": out, "tools": json.dumps(tools) if tools is not None else None}


def _rft(row: dict, fmt: str) -> dict:
    """A reinforcement row: its prompt (messages that end before the answer, or a string) and the whole row as the
    `item` (JSON) that the grader's `{{item.*}}` reads."""
    if fmt == "rft_messages":
        prompt = _messages(row["messages"], "messages")
        if prompt[-1]["role"] == "assistant":
            raise _RowError(f"messages[{len(prompt) - 1}].role", "the last message is the answer the model is to write")
        if "prompt" in row:
            raise _RowError("prompt", "give messages or prompt, not both")
    else:
        prompt = _string(row, "prompt")
    for key in ("tools", "parallel_tool_calls"):
        if row.get(key) is not None:
            raise _RowError(key, "tools in reinforcement data are not supported yet")
    return {"prompt": prompt, "item": json.dumps(row, ensure_ascii=False)}


def _split_hh(text: str, key: str) -> tuple[str, str]:
    """An HH transcript into (conversation up to and including the last 'Assistant:', final answer)."""
    if HUMAN not in text:
        raise _RowError(key, "not an HH transcript: no '\\n\\nHuman:' turn")
    cut = text.rfind(ASSISTANT)
    if cut < text.find(HUMAN):
        raise _RowError(key, "not an HH transcript: no '\\n\\nAssistant:' turn after the first Human turn")
    cut += len(ASSISTANT)
    if not text[cut:].strip():
        raise _RowError(key, "empty final Assistant answer")
    return text[:cut], text[cut:]


def _rft_messages(value: object) -> bool:
    """Messages that end before the answer (OpenAI's reinforcement rows): the model is to write the next turn."""
    return (
        isinstance(value, list) and bool(value) and isinstance(value[-1], dict) and value[-1].get("role") != "assistant"
    )


def detect_format(row: dict, kinds: tuple[str, ...] | None = None) -> str | None:
    """The format a row is written in, judged by its keys (None if no known key is present). A prompt alone is a
    reinforcement row where `kinds` allows one (or nothing is asked of the data), else a pair that lacks its answers."""
    if "input" in row or "preferred_output" in row or "non_preferred_output" in row:
        return "openai_dpo"
    if "messages" in row:
        rft = _rft_messages(row["messages"]) if kinds is None else "rft" in kinds
        return "rft_messages" if rft else "sft_messages"
    if "text" in row:
        return "sft_text"
    if "label" in row:
        return "kto_unpaired"
    if "completion" in row:
        return "sft_prompt_completion"
    if "chosen" in row or "rejected" in row:
        if "prompt" in row:
            return "dpo_conversational" if isinstance(row["prompt"], list) else "dpo_pairs"
        return "dpo_conversational" if isinstance(row.get("chosen"), list) else "hh_rlhf"
    if "prompt" in row:
        # a prompt alone: a reinforcement row, or a pair whose answers are missing (reported as such)
        return "rft_prompt" if kinds is None or "rft" in kinds else "dpo_pairs"
    return None


def normalise(row: dict, fmt: str) -> dict:
    """Check one row of a known format and return it in the form TRL reads; raises _RowError."""
    if fmt == "dpo_pairs":
        return {
            "prompt": _string(row, "prompt", empty_ok=True),
            "chosen": _string(row, "chosen"),
            "rejected": _string(row, "rejected"),
        }
    if fmt == "dpo_conversational":
        for key in ("chosen", "rejected"):
            if key not in row:
                raise _RowError(key, "missing")
        chosen = _messages(row["chosen"], "chosen", need_assistant=True)
        rejected = _messages(row["rejected"], "rejected", need_assistant=True)
        if "prompt" in row:
            return {"prompt": _messages(row["prompt"], "prompt"), "chosen": chosen, "rejected": rejected}
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise _RowError("chosen", "no prompt field and no shared first message with rejected")
        return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}
    if fmt == "openai_dpo":
        inp = row.get("input")
        if not isinstance(inp, dict):
            raise _RowError("input", "missing" if inp is None else f"expected an object, got {_type_name(inp)}")
        if "messages" not in inp:
            raise _RowError("input.messages", "missing")
        for key in ("tools", "parallel_tool_calls"):
            if inp.get(key) is not None:  # refused, never dropped: the pair would train without the tools it was about
                raise _RowError(f"input.{key}", f"{NO_TOOLS_IN_PAIRS} (SFT's messages take them)")
        for key in ("preferred_output", "non_preferred_output"):
            if key not in row:
                raise _RowError(key, "missing")
        return {
            "prompt": _messages(inp["messages"], "input.messages"),
            "chosen": _messages(row["preferred_output"], "preferred_output", need_assistant=True),
            "rejected": _messages(row["non_preferred_output"], "non_preferred_output", need_assistant=True),
        }
    if fmt == "hh_rlhf":
        prompt_c, chosen = _split_hh(_string(row, "chosen"), "chosen")
        prompt_r, rejected = _split_hh(_string(row, "rejected"), "rejected")
        if prompt_c != prompt_r:
            raise _RowError("rejected", "chosen and rejected differ before their final Assistant turn")
        return {"prompt": prompt_c, "chosen": chosen, "rejected": rejected}
    if fmt == "sft_prompt_completion":
        if isinstance(row.get("prompt"), list) or isinstance(row.get("completion"), list):
            if "prompt" not in row:
                raise _RowError("prompt", "missing")
            return {
                "prompt": _messages(row["prompt"], "prompt"),
                "completion": _messages(row.get("completion"), "completion", need_assistant=True),
            }
        return {"prompt": _string(row, "prompt", empty_ok=True), "completion": _string(row, "completion")}
    if fmt == "kto_unpaired":
        label = row["label"]
        if not isinstance(label, bool):
            raise _RowError("label", f"expected true (desirable) or false (undesirable), got {_type_name(label)}")
        return {**normalise(row, "sft_prompt_completion"), "label": label}
    if fmt == "sft_messages":
        return _chat(row)
    if fmt in ("rft_messages", "rft_prompt"):
        return _rft(row, fmt)
    if fmt == "sft_text":
        return {"text": _string(row, "text")}
    raise ValueError(f"Unknown format: {fmt}")


def _fingerprint(example: dict) -> int:
    """64 bits of the row's canonical JSON: collisions are unlikely (~3e-6 at 10M rows) and cost a false warning."""
    return int.from_bytes(hashlib.blake2b(json.dumps(example, sort_keys=True).encode(), digest_size=8).digest())


def _depth(value) -> int:
    depth, level = 0, [(value, 1)]
    while level:
        node, d = level.pop()
        depth = max(depth, d)
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        level += [(c, d + 1) for c in children if isinstance(c, (dict, list))]
    return depth


def _bad_text(value, path: str = "") -> tuple[str, str] | None:
    """(field, reason) of the first string holding a NUL or a lone surrogate (text that cannot be encoded)."""
    stack = [(value, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, str):
            if "\x00" in node:
                return where or "-", "contains a NUL character"
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return where or "-", "contains a lone surrogate (\\ud800-\\udfff): not encodable text"
        elif isinstance(node, dict):
            stack += [(v, f"{where}.{k}" if where else str(k)) for k, v in node.items()]
        elif isinstance(node, list):
            stack += [(v, f"{where}[{i}]") for i, v in enumerate(node)]
    return None


_SUSPECT = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")  # JSON escapes of NUL or a surrogate half


def _parse(text: str, limits: Limits) -> tuple[object | None, tuple[str, str] | None]:
    """The line's JSON value, or (None, (field, reason))."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, ("-", f"malformed JSON: {exc.msg} at column {exc.colno}")
    except RecursionError:
        return None, ("-", f"JSON nested deeper than {limits.max_json_depth} levels")
    if text.count("[") + text.count("{") > limits.max_json_depth and _depth(row) > limits.max_json_depth:
        return None, ("-", f"JSON nested deeper than {limits.max_json_depth} levels")
    if _SUSPECT.search(text) and (bad := _bad_text(row)):
        return None, bad
    return row, None


def bounded_lines(fh, max_line_bytes: int) -> Iterator[bytes | LongLine]:
    """The lines of a binary file; a line longer than `max_line_bytes` is skipped in bounded chunks."""
    while line := fh.readline(max_line_bytes + 1):
        if len(line) <= max_line_bytes or line.endswith(b"\n") and len(line) == max_line_bytes + 1:
            yield line
            continue
        length = len(line)
        while not line.endswith(b"\n") and (line := fh.readline(1 << 20)):
            length += len(line)
        yield LongLine(length)


def check_lines(
    lines: Iterable[bytes | LongLine],
    method: str | tuple[str, ...] | None = None,
    limits: Limits = Limits(),
    keep: bool = True,
) -> tuple[Report, list[dict]]:
    """Validate JSONL lines (bytes, without caring for line endings); return the report and, with `keep`, the
    normalised rows. Memory stays bounded without `keep`: 12 bytes per distinct row for duplicates
    (`training.fingerprints`), 50 listed problems.

    `method` (a data kind, 'dpo', 'sft', 'kto' or 'rft', or several) is what the data must serve; None accepts any and
    reports which it is.
    """
    kinds = (method,) if isinstance(method, str) else method
    report = Report()
    examples: list[dict] = []
    seen = Fingerprints()
    first_line = 0
    for number, raw in enumerate(lines, start=1):
        if isinstance(raw, LongLine):
            report.error(number, "-", f"line of {raw.length} bytes, longer than the limit of {limits.max_line_bytes}")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            report.error(number, "-", f"not valid UTF-8: byte 0x{raw[exc.start]:02x} at column {exc.start + 1}")
            continue
        if not text.strip():
            continue
        if report.rows >= limits.max_rows:
            report.error(number, "-", f"more than {limits.max_rows} rows, the limit")
            break
        row, problem = _parse(text.rstrip("\r\n"), limits)
        if problem:
            report.error(number, *problem)
            continue
        if not isinstance(row, dict):
            report.error(number, "-", f"expected a JSON object, got {_type_name(row)}")
            continue
        fmt = detect_format(row, kinds)
        if fmt is None:
            keys = ", ".join(sorted(row)[:20]) or "none"
            report.error(number, "-", f"no known fields (has {keys}); see the accepted formats")
            continue
        if report.format is None:
            row_method = FORMAT_METHOD[fmt]
            if kinds is not None and row_method not in kinds:
                wanted = " or ".join(kinds)
                report.error(number, "-", f"format {fmt} holds {row_method} data, but the method needs {wanted} data")
                return report, []
            report.format, report.method, first_line = fmt, row_method, number
        elif fmt != report.format:
            report.error(number, "-", f"mixed formats: this line is {fmt}, line {first_line} is {report.format}")
            continue
        try:
            example = normalise(row, fmt)
        except _RowError as exc:
            report.error(number, exc.field, exc.reason)
            continue
        report.rows += 1
        if fmt == "sft_messages":
            assistant = [m for m in example["messages"] if m["role"] == "assistant"]
            report.tool_examples += bool(example["tools"] or any(m["tool_calls"] for m in assistant))
            report.untrained_messages += sum(m["weight"] == 0 for m in assistant)
        _warn_about(report, number, example, seen)
        if keep:
            examples.append(example)
    if report.rows == 0 and report.error_count == 0:
        report.error(0, "-", "no rows: the file is empty")
    return report, examples


def _warn_about(report: Report, number: int, example: dict, seen: Fingerprints) -> None:
    if (first := seen.first_line(_fingerprint(example), number)) is not None:
        report.warn(number, "-", f"duplicate of line {first}")
    if "chosen" in example and example["chosen"] == example["rejected"]:
        report.warn(number, "rejected", "identical to chosen: the pair carries no preference")
    if example.get("prompt") in ("", []) or (isinstance(example.get("prompt"), str) and not example["prompt"].strip()):
        report.warn(number, "prompt", "empty field")


def iter_file_lines(path: str | Path, max_line_bytes: int = Limits.max_line_bytes) -> Iterator[bytes | LongLine]:
    with open(path, "rb") as fh:
        yield from bounded_lines(fh, max_line_bytes)


def check_file(path: str | Path, method: str | tuple[str, ...] | None = None) -> tuple[Report, list[dict]]:
    return check_lines(iter_file_lines(path), method)


def read_examples(path: str | Path, method: str | tuple[str, ...], source: str = "the data") -> list[dict]:
    """Normalised rows of a data file, or a `DataError` carrying the report."""
    report, examples = check_file(path, method)
    if not report.ok:
        raise DataError(report, source)
    return examples
