"""What a fuzzer or an attacker sends the API on PostgreSQL: out-of-range integers, NUL bytes, deep JSON. Every
answer is a 4xx in the one error shape, documented in the OpenAPI document; nothing reaches a 500."""

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from jobs.models import Job
from settings import Settings

DEEP = "[" * 10_000 + "]" * 10_000
EXISTING = "job_00000000000000000000001"


@pytest.fixture(scope="module")
def pg_client(tmp_path_factory, broker_url, pg_template):
    from tests.services import create_pg_database, drop_pg_database

    url, name = create_pg_database(template=pg_template)
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("edges"), database_url=url, broker_url=broker_url.rsplit("/", 1)[0] + "/2"
    )
    from tests.services import make_key

    key = make_key(url, "default", admin=True)
    client = TestClient(create_app(settings), raise_server_exceptions=False, headers={"Authorization": f"Bearer {key}"})
    job = Job(id=EXISTING, method="dpo", trainer="basic", gpus=1, model="/m", dataset_id="ds_x")
    client.app.state.services.store.create_jobs([(job, [("queued", {})])])
    yield client
    drop_pg_database(name)


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("GET", f"/jobs/{EXISTING}/events?after=33784276212", {}),
        ("GET", "/jobs/job_%00x", {}),
        ("GET", "/jobs/job_%00x/events", {}),
        ("POST", "/jobs/job_%00x/cancel", {}),
        ("GET", "/jobs?after=job_%00", {}),
        ("GET", "/jobs?created_after=1e400", {}),
        ("GET", "/jobs?created_after=nan", {}),
        ("GET", "/datasets/ds_%00", {}),
        ("POST", "/jobs", {"json": {"model": "/m\u0000", "dataset": "ds_x", "method": "dpo"}}),
        ("POST", "/jobs", {"json": {"model": "/m", "dataset": "ds_x", "method": "dpo", "metadata": {"k": "v\u0000"}}}),
        (
            "POST",
            "/jobs",
            {
                "content": '{"model": "/m", "dataset": "ds_x", "method": "dpo", "hyperparameters": {"a": '
                + DEEP
                + "}}",
                "headers": {"content-type": "application/json"},
            },
        ),
        (
            "POST",
            "/datasets",
            {"files": {"file": ("deep.jsonl", b'{"prompt": %s, "chosen": "a", "rejected": "b"}\n' % DEEP.encode())}},
        ),
    ],
)
def test_bad_input_is_a_4xx_in_the_one_shape(pg_client, method, path, kwargs):
    r = pg_client.request(method, path, **kwargs)
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert error["code"] and error["message"]
    assert "SELECT" not in r.text and "psycopg" not in r.text.lower(), "no SQL or driver text reaches a client"


def test_the_openapi_document_lists_every_error_a_route_answers(pg_client):
    doc = pg_client.get("/openapi.json").json()
    assert set(doc["components"]["schemas"]["ErrorBody"]["properties"]) == {"error"}
    for path, ops in doc["paths"].items():
        for verb, op in ops.items():
            codes = set(op["responses"])
            if path not in ("/healthz", "/readyz", "/metrics"):
                assert "401" in codes, (verb, path, codes)
            openai = path.startswith("/v1/")  # OpenAI's face: invalid requests are 400s, in its error shape
            if op.get("parameters") or op.get("requestBody"):
                assert ("400" if openai else "422") in codes and not (openai and "422" in codes), (verb, path)
            if "{job_id}" in path or "{dataset_id}" in path or "{file_id}" in path:
                assert "404" in codes, (verb, path)
            for code in codes - {"200", "201", "202", "204"}:  # 204: no content, not an error
                if code != "503" or path != "/readyz":
                    ref = op["responses"][code]["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/OpenAIErrorBody" if openai else "/ErrorBody"), (verb, path, code)
    assert "503" in doc["paths"]["/jobs"]["post"]["responses"]
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}


def test_a_crash_answers_500_without_its_text(pg_client, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("SELECT secret FROM jobs WHERE password = 'hunter2'")

    monkeypatch.setattr(pg_client.app.state.services.store, "list_jobs", explode)
    r = pg_client.get("/jobs")
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert "hunter2" not in r.text and "SELECT" not in r.text and "request" in r.json()["error"]["message"]
