"""Training data formats: detect, validate and normalise JSONL, line by line. Torch-free.

Accepted forms, one JSON object per line:

| format | method | fields |
| --- | --- | --- |
| `dpo_pairs` | dpo | `prompt`, `chosen`, `rejected`: strings |
| `dpo_conversational` | dpo | `prompt`, `chosen`, `rejected`: message lists (`prompt` may be left out: then it is the shared start of `chosen` and `rejected`) |
| `openai_dpo` | dpo | `input.messages`, `preferred_output`, `non_preferred_output`: message lists |
| `hh_rlhf` | dpo | `chosen`, `rejected`: whole `\\n\\nHuman:` / `\\n\\nAssistant:` transcripts |
| `sft_prompt_completion` | sft | `prompt`, `completion`: strings, or message lists |
| `sft_messages` | sft | `messages`: a message list with at least one assistant turn |
| `sft_text` | sft | `text`: a string |
| `kto_unpaired` | kto | `prompt`, `completion`: strings, or message lists; `label`: true (desirable) or false |

A message is `{"role": "system"|"user"|"assistant"|"developer"|"tool", "content": string}`.

Normalised rows are what TRL reads: DPO `{"prompt", "chosen", "rejected"}` (strings, or message lists
for the conversational forms), SFT `{"prompt", "completion"}`, `{"messages"}` or `{"text"}`, KTO
`{"prompt", "completion", "label"}`.
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
}


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
        if not isinstance(content, str):
            raise _RowError(f"{where}.content", f"expected a string, got {_type_name(content)}")
        if not content.strip() and role == "assistant":
            raise _RowError(f"{where}.content", "empty string")
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise _RowError(path, "no assistant message to learn from")
    return out


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


def detect_format(row: dict) -> str | None:
    """The format a row is written in, judged by its keys (None if no known key is present)."""
    if "input" in row or "preferred_output" in row or "non_preferred_output" in row:
        return "openai_dpo"
    if "messages" in row:
        return "sft_messages"
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
        return "dpo_pairs"  # a prompt alone: report the pair fields as missing
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
        return {"messages": _messages(row["messages"], "messages", need_assistant=True)}
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

    `method` (a data kind, 'dpo', 'sft' or 'kto', or several) is what the data must serve; None accepts any and
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
        fmt = detect_format(row)
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
