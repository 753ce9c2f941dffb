import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, python_env
from training.formats import check_lines

MSG = lambda role, content: {"role": role, "content": content}  # noqa: E731


def lines(*rows) -> list[bytes]:
    return [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]


def only_error(rows, method="dpo"):
    report, _ = check_lines(lines(*rows), method)
    assert report.error_count == 1, report.errors
    return report.errors[0]


@pytest.mark.parametrize(
    ("row", "fmt", "expected"),
    [
        ({"prompt": "Q", "chosen": "A", "rejected": "B"}, "dpo_pairs", {"prompt": "Q", "chosen": "A", "rejected": "B"}),
        (
            {"prompt": [MSG("user", "Q")], "chosen": [MSG("assistant", "A")], "rejected": [MSG("assistant", "B")]},
            "dpo_conversational",
            {"prompt": [MSG("user", "Q")], "chosen": [MSG("assistant", "A")], "rejected": [MSG("assistant", "B")]},
        ),
        (
            {
                "chosen": [MSG("user", "Q"), MSG("assistant", "A")],
                "rejected": [MSG("user", "Q"), MSG("assistant", "B")],
            },
            "dpo_conversational",
            {"prompt": [MSG("user", "Q")], "chosen": [MSG("assistant", "A")], "rejected": [MSG("assistant", "B")]},
        ),
        (
            {
                "input": {"messages": [MSG("user", "Q")]},
                "preferred_output": [MSG("assistant", "A")],
                "non_preferred_output": [MSG("assistant", "B")],
            },
            "openai_dpo",
            {"prompt": [MSG("user", "Q")], "chosen": [MSG("assistant", "A")], "rejected": [MSG("assistant", "B")]},
        ),
        (
            {
                "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: sum 2+2?\n\nAssistant: 4",
                "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: sum 2+2?\n\nAssistant: 5",
            },
            "hh_rlhf",
            {
                "prompt": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: sum 2+2?\n\nAssistant:",
                "chosen": " 4",
                "rejected": " 5",
            },
        ),
    ],
)
def test_dpo_formats_are_detected_and_normalised(row, fmt, expected):
    report, rows = check_lines(lines(row), "dpo")
    assert report.ok and report.format == fmt and report.method == "dpo"
    assert rows == [expected]


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"prompt": "Q", "completion": "A"}, "sft_prompt_completion"),
        ({"prompt": [MSG("user", "Q")], "completion": [MSG("assistant", "A")]}, "sft_prompt_completion"),
        ({"messages": [MSG("system", "S"), MSG("user", "Q"), MSG("assistant", "A")]}, "sft_messages"),
        ({"text": "some text"}, "sft_text"),
    ],
)
def test_sft_formats_are_detected(row, fmt):
    from training.chat import clean

    report, rows = check_lines(lines(row), "sft")
    assert report.ok and report.format == fmt
    if fmt == "sft_messages":  # every message with every key, null where unset: one Arrow schema for a split
        assert clean(rows[0]["messages"]) == row["messages"] and rows[0]["tools"] is None
    else:
        assert rows == [row]


def test_malformed_json_names_line_and_column():
    err = only_error([{"prompt": "Q", "chosen": "A", "rejected": "B"}, b'{"prompt": "Q", "chosen": "A"'])
    assert (err.line, err.field) == (2, "-")
    assert err.reason.startswith("malformed JSON") and "column 30" in err.reason


def test_wrong_type_names_the_field():
    err = only_error([{"prompt": "Q", "chosen": ["A"], "rejected": "B"}])
    assert (err.line, err.field, err.reason) == (1, "chosen", "expected a string, got array")


def test_wrong_type_inside_messages_names_the_path():
    row = {
        "input": {"messages": [MSG("user", "Q"), {"role": "user", "content": 7}]},
        "preferred_output": [MSG("assistant", "A")],
        "non_preferred_output": [MSG("assistant", "B")],
    }
    err = only_error([row])
    assert (err.field, err.reason) == ("input.messages[1].content", "expected a string, got number")


def test_tools_in_preference_pairs_are_refused_naming_the_field_not_dropped():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    pair = {"preferred_output": [MSG("assistant", "A")], "non_preferred_output": [MSG("assistant", "B")]}
    err = only_error([{"input": {"messages": [MSG("user", "Q")], "tools": tools}, **pair}])
    assert err.field == "input.tools" and "not supported yet" in err.reason
    called = {"role": "assistant", "content": None, "tool_calls": [call]}
    err = only_error([{"input": {"messages": [MSG("user", "Q")]}, **pair, "preferred_output": [called]}])
    assert err.field == "preferred_output[0].tool_calls" and "not supported yet" in err.reason
    answered = {"role": "tool", "content": "1", "tool_call_id": "c1"}
    err = only_error(
        [
            {
                "prompt": [MSG("user", "Q"), answered],
                "chosen": [MSG("assistant", "A")],
                "rejected": [MSG("assistant", "B")],
            }
        ]
    )
    assert err.field == "prompt[1].tool_call_id"


def test_missing_field_is_named():
    err = only_error([{"prompt": "Q", "chosen": "A"}])
    assert (err.line, err.field, err.reason) == (1, "rejected", "missing")


def test_empty_string_is_an_error_for_answers_and_a_warning_for_prompts():
    err = only_error([{"prompt": "Q", "chosen": "   ", "rejected": "B"}])
    assert (err.field, err.reason) == ("chosen", "empty string")
    report, rows = check_lines(lines({"prompt": "", "chosen": "A", "rejected": "B"}), "dpo")
    assert report.ok and len(rows) == 1
    assert [(w.field, w.reason) for w in report.warnings] == [("prompt", "empty field")]


def test_non_utf8_bytes_are_reported():
    err = only_error([{"prompt": "Q", "chosen": "A", "rejected": "B"}, b'{"prompt": "caf\xe9"}'])
    assert err.line == 2 and err.reason == "not valid UTF-8: byte 0xe9 at column 16"


def test_empty_file_is_an_error():
    report, rows = check_lines([b"", b"\n"], "dpo")
    assert not report.ok and rows == []
    assert report.errors[0].reason == "no rows: the file is empty"


def test_mixed_formats_are_reported_per_line():
    err = only_error([{"prompt": "Q", "chosen": "A", "rejected": "B"}, {"text": "T"}], method=None)
    assert err.line == 2 and err.reason == "mixed formats: this line is sft_text, line 1 is dpo_pairs"


def test_data_of_the_other_method_is_refused():
    err = only_error([{"text": "T"}], method="dpo")
    assert err.reason == "format sft_text holds sft data, but the method needs dpo data"


def test_kto_rows_are_checked_and_kto_takes_pairs_too():
    rows = [
        {"prompt": "Q", "completion": "A", "label": True},
        {
            "prompt": [{"role": "user", "content": "Q"}],
            "completion": [{"role": "assistant", "content": "B"}],
            "label": False,
        },
    ]
    report, out = check_lines([json.dumps(r).encode() for r in rows], ("kto", "dpo"))
    assert report.ok and (report.format, report.method) == ("kto_unpaired", "kto") and out[1]["label"] is False
    err = only_error([{"prompt": "Q", "completion": "A", "label": 1}], method="kto")
    assert (err.field, err.reason) == ("label", "expected true (desirable) or false (undesirable), got number")
    pairs = [json.dumps({"prompt": "Q", "chosen": "A", "rejected": "B"}).encode()]
    assert check_lines(pairs, ("kto", "dpo"))[0].method == "dpo"
    refused = only_error([{"text": "T"}], method=("kto", "dpo"))
    assert refused.reason == "format sft_text holds sft data, but the method needs kto or dpo data"


def test_hh_pair_with_different_conversations_is_refused():
    err = only_error([{"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}])
    assert err.field == "rejected" and "differ before their final Assistant turn" in err.reason


def test_warnings_for_duplicates_and_identical_answers():
    row = {"prompt": "Q", "chosen": "A", "rejected": "B"}
    report, rows = check_lines(lines(row, row, {"prompt": "Q", "chosen": "A", "rejected": "A"}), "dpo")
    assert report.ok and len(rows) == 3
    assert [(w.line, w.reason) for w in report.warnings] == [
        (2, "duplicate of line 1"),
        (3, "identical to chosen: the pair carries no preference"),
    ]


def test_errors_are_counted_beyond_the_listed_fifty():
    report, _ = check_lines([b"not json"] * 80, "dpo")
    assert report.error_count == 80 and len(report.errors) == 50


def test_validate_command_reports_and_fails_on_errors(tmp_path, micro_model, toy_dpo):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "Q", "chosen": "A", "rejected": "B"}\n{"prompt": 1, "chosen": "A", "rejected": "B"}\n')
    cmd = [sys.executable, "-m", "training", "validate"]
    out = subprocess.run(
        [*cmd, str(bad), "--method", "dpo"], capture_output=True, text=True, env=python_env(), cwd=ROOT
    )
    assert out.returncode == 2
    assert "line 2: prompt: expected a string, got number" in out.stdout
    out = subprocess.run(
        [*cmd, str(toy_dpo), "--model", str(micro_model), "--max-length", "12", "--json"],
        capture_output=True,
        text=True,
        env=python_env(),
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["rows"] == 400 and report["format"] == "dpo_pairs"
    lengths = report["token_lengths"]
    assert 10 <= lengths["p50"] <= lengths["p95"] <= lengths["max"] <= 20
    assert lengths["truncated_rows"] > 0
