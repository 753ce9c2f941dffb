"""Graders (`training.graders`): each type and metric against hand-computed scores, the python grader's sandbox as an
attacker would try it, and the API's faces: the real `openai` SDK's `fine_tuning.alpha.graders.run` and `.validate`
(in-process), the native routes, and a `score_model` judged by a model that `prefq serve` serves (the session stack)."""

import os

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

from api.app import create_app
from tests.services import make_key
from training import graders
from training.graders import Limits, run_python

ANSWER = {"type": "string_check", "name": "answer", "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}
PY = "def grade(sample, item):\n    return 1.0 if item['answer'] in sample['output_text'] else 0.0\n"


def score(grader: dict, text: str, item=None) -> float:
    graded = graders.grade(grader, text, item)
    assert not graded.failed, graded.errors
    return graded.reward


def test_string_checks_and_templates():
    item = {"answer": "6", "meta": {"unit": "apples"}}
    assert score({**ANSWER, "operation": "eq"}, "6", item) == 1.0
    assert score({**ANSWER, "operation": "eq"}, "6.", item) == 0.0
    assert score({**ANSWER, "operation": "ne"}, "7", item) == 1.0
    assert score({**ANSWER, "operation": "like"}, "The answer is 6.", item) == 1.0
    apples = {**ANSWER, "operation": "ilike", "reference": "{{item.answer}} {{item.meta.unit}}"}
    assert score(apples, "SIX is 6 APPLES", item) == 1.0
    assert score({**ANSWER, "operation": "like"}, "The answer is 7.", item) == 0.0
    as_json = {**ANSWER, "operation": "eq", "input": "{{sample.output_json.total}}"}
    assert score(as_json, '{"total": "6"}', item) == 1.0
    missing = graders.grade({**ANSWER, "operation": "eq", "reference": "{{item.nothing}}"}, "6", item)
    assert missing.reward == 0.0 and missing.errors["invalid_variable_error"]


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        # candidate "the cat is on the mat", reference "the cat sat on the mat": 6 words each
        ("rouge_1", 5 / 6),  # 5 unigrams shared (the x2, cat, on, mat)
        ("rouge_2", 3 / 5),  # bigrams shared: "the cat", "on the", "the mat"
        ("rouge_l", 5 / 6),  # longest common subsequence: the cat on the mat
        ("gleu", (5 + 3 + 1 + 0) / 18),  # 1..4-grams shared over 6+5+4+3 on either side
        ("fuzzy_match", 40 / 43),  # difflib's ratio: 2 x 20 matching characters of 21 + 22
    ],
)
def test_text_similarity_by_hand(metric, expected):
    grader = {
        "type": "text_similarity",
        "name": "s",
        "input": "{{sample.output_text}}",
        "reference": "the cat sat on the mat",
    }
    assert score({**grader, "evaluation_metric": metric}, "the cat is on the mat") == pytest.approx(expected)


def test_bleu_by_hand():
    grader = {"type": "text_similarity", "name": "b", "input": "{{sample.output_text}}", "evaluation_metric": "bleu"}
    assert score({**grader, "reference": "the cat sat on the mat"}, "the cat sat on the mat") == pytest.approx(1.0)
    # precisions 5/6, (3+1)/(5+1), (1+1)/(4+1), (0+1)/(3+1) (add-one above unigrams), same length: no penalty
    expected = (5 / 6 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    assert score({**grader, "reference": "the cat sat on the mat"}, "the cat is on the mat") == pytest.approx(expected)
    assert score({**grader, "reference": "the cat"}, "dogs bark") == 0.0


def test_multi_grader_combines_named_scores_by_its_formula():
    multi = {
        "type": "multi",
        "name": "both",
        "graders": {"exact": {**ANSWER, "operation": "eq"}, "code": {"type": "python", "name": "code", "source": PY}},
        "calculate_output": "0.25 * exact + 0.75 * code",
    }
    graded = graders.grade(multi, "The answer is 6.", {"answer": "6"})
    assert graded.reward == pytest.approx(0.75) and graded.sub_rewards == {"exact": 0.0, "code": 1.0}


@pytest.mark.parametrize(
    ("grader", "param", "words"),
    [
        ({"type": "nope", "name": "x"}, "grader.type", "type must be one of"),
        ({**ANSWER, "operation": "gt"}, "grader.operation", "'eq', 'ne', 'like' or 'ilike'"),
        ({**ANSWER, "operation": "eq", "input": None}, "grader.input", "valid string"),
        (
            {"type": "text_similarity", "name": "t", "input": "a", "reference": "b", "evaluation_metric": "meteor"},
            "grader.evaluation_metric",
            "WordNet",
        ),
        ({"type": "python", "name": "p", "source": "def grade(:"}, "grader.source", "does not parse"),
        ({"type": "python", "name": "p", "source": "x = 1"}, "grader.source", "no function `grade"),
        (
            {"type": "multi", "name": "m", "graders": {"a": {**ANSWER, "operation": "zz"}}, "calculate_output": "a"},
            "grader.graders.a.operation",
            "'eq', 'ne'",
        ),
        (
            {
                "type": "multi",
                "name": "m",
                "graders": {"a": {**ANSWER, "operation": "eq"}},
                "calculate_output": "a + b",
            },
            "grader.calculate_output",
            "'b' is not one of the graders",
        ),
        (
            {
                "type": "multi",
                "name": "m",
                "graders": {"a": {**ANSWER, "operation": "eq"}},
                "calculate_output": "open(a)",
            },
            "grader.calculate_output",
            "only min, max",
        ),
        (
            {
                "type": "label_model",
                "name": "l",
                "model": "m",
                "input": [{"role": "user", "content": "x"}],
                "labels": ["good", "bad"],
                "passing_labels": ["great"],
            },
            "grader.passing_labels",
            "not among labels",
        ),
    ],
)
def test_bad_graders_name_the_field(grader, param, words):
    with pytest.raises(graders.GraderError) as raised:
        graders.parse(grader)
    assert raised.value.param == param and words in str(raised.value), (raised.value.param, str(raised.value))


# -- the sandbox: what an untrusted grade() tries ------------------------------------------------------------------

SHORT = Limits(seconds=3, memory_bytes=256 << 20)


def attempt(body: str, limits: Limits = SHORT) -> graders.PythonResult:
    return run_python("def grade(sample, item):\n" + body, {"output_text": "x"}, {}, limits)


def test_the_python_grader_cannot_read_files_outside_its_scratch_folder():
    found = attempt("    return len(open('/etc/passwd').read())\n")
    assert found.score is None and "not allowed in a grader: open /etc/passwd" in found.error
    found = attempt("    import os\n    return len(os.listdir('/tmp'))\n")
    assert found.score is None and "not allowed" in found.error
    assert attempt("    open('out.txt', 'w').write('abc')\n    return len(open('out.txt').read())\n").score == 3.0


def test_the_python_grader_cannot_reach_a_socket_or_load_native_code():
    found = attempt("    import socket\n    socket.create_connection(('127.0.0.1', 6379), timeout=1)\n    return 1\n")
    assert found.score is None and "not allowed in a grader: socket" in found.error
    found = attempt("    import ctypes\n    return ctypes.CDLL(None).getpid()\n")
    assert found.score is None and "not allowed" in found.error


def test_the_python_grader_cannot_fork_without_bound():
    found = attempt("    import os\n    while True:\n        os.fork()\n")
    assert found.score is None and "not allowed in a grader: os.fork" in found.error
    found = attempt("    import subprocess\n    return subprocess.call(['true'])\n")
    assert found.score is None and "not allowed in a grader: subprocess" in found.error


def test_the_python_grader_cannot_outlive_its_time_or_memory():
    found = attempt("    while True:\n        pass\n", Limits(seconds=1.5))
    assert found.score is None and found.kind == "python_grader_server_error" and "timed out" in found.error
    assert found.seconds < 5
    found = attempt("    x = bytearray(1 << 30)\n    return 1\n")
    assert found.score is None and "MemoryError" in found.error


@pytest.mark.skipif(os.geteuid() != 0, reason="only a grader started by root drops to nobody")
def test_a_grader_started_by_root_runs_as_nobody():
    assert attempt("    import os\n    return os.getuid()\n").score == 65534.0


def test_a_failing_grader_scores_zero_and_says_why():
    graded = graders.grade({"type": "python", "name": "p", "source": "def grade(s, i):\n    return 1 / 0\n"}, "x", {})
    assert graded.reward == 0.0 and graded.errors["python_grader_runtime_error"]
    assert "ZeroDivisionError" in graded.errors["python_grader_runtime_error_details"]


# -- the API -------------------------------------------------------------------------------------------------------


@pytest.fixture
def sdk(settings):
    key = make_key(settings.database_url, "graders")
    return OpenAI(
        base_url="http://testserver/v1", api_key=key, http_client=TestClient(create_app(settings)), max_retries=0
    )


def test_the_sdk_runs_and_validates_graders(sdk):
    multi = {
        "type": "multi",
        "name": "both",
        "graders": {"exact": {**ANSWER, "operation": "like"}, "code": {"type": "python", "name": "code", "source": PY}},
        "calculate_output": "(exact + code) / 2",
    }
    ran = sdk.fine_tuning.alpha.graders.run(grader=multi, model_sample="The answer is 6.", item={"answer": "6"})
    assert ran.reward == 1.0 and ran.sub_rewards == {"exact": 1.0, "code": 1.0}
    assert ran.metadata.name == "both" and ran.metadata.type == "multi" and not ran.metadata.errors.formula_parse_error
    valid = sdk.fine_tuning.alpha.graders.validate(grader={**ANSWER, "operation": "eq"})
    assert valid.grader.type == "string_check" and valid.grader.operation == "eq"
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.fine_tuning.alpha.graders.validate(grader={**ANSWER, "operation": "gt"})
    assert bad.value.param == "grader.operation" and bad.value.code == "invalid_grader"
    failing = sdk.fine_tuning.alpha.graders.run(
        grader={"type": "python", "name": "p", "source": "def grade(s, i):\n    return open('/etc/passwd').read()\n"},
        model_sample="x",
    )
    assert failing.reward == 0.0 and failing.metadata.errors.python_grader_runtime_error


def test_native_graders_routes(settings):
    from tests.test_api import keyed

    client = keyed(settings)
    r = client.post(
        "/graders/run", json={"grader": {**ANSWER, "operation": "eq"}, "model_sample": "6", "item": {"answer": "6"}}
    )
    assert r.status_code == 200 and r.json()["reward"] == 1.0 and r.json()["errors"] == {}, r.text
    r = client.post("/graders/validate", json={"grader": {"type": "python", "name": "p", "source": "x = 1"}})
    assert r.status_code == 422 and (r.json()["error"]["code"], r.json()["error"]["field"]) == (
        "invalid_grader",
        "grader.source",
    )


def test_a_score_model_grader_judged_by_a_served_model_and_never_another_tenants(stack, dpo_job):
    judge = dpo_job.sdk.fine_tuned_model
    grader = {
        "type": "score_model",
        "name": "judge",
        "model": judge,
        "input": [{"role": "user", "content": "Rate from 0 to 1: {{sample.output_text}} (expected {{item.answer}})"}],
        "range": [0, 1],
    }
    ran = dpo_job.client.fine_tuning.alpha.graders.run(
        grader=grader, model_sample="The answer is 6.", item={"answer": "6"}
    )
    assert 0.0 <= ran.reward <= 1.0 and not ran.metadata.errors.model_grader_server_error, ran
    other = OpenAI(
        base_url=f"{stack.url}/v1", api_key=make_key(stack.env["PREFQ_DATABASE_URL"], "graders-other"), max_retries=0
    )
    with pytest.raises(openai.BadRequestError) as refused:
        other.fine_tuning.alpha.graders.run(grader=grader, model_sample="x", item={"answer": "6"})
    assert refused.value.param == "grader.model" and judge in refused.value.message
