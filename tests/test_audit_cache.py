"""Two API processes on one PostgreSQL database (the Kubernetes base runs two replicas) agree about deleted files:
a file deleted through one is refused by the other at once, however warm that one's cache of datasets is."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from jobs.db import upgrade
from tests.services import Stack, create_pg_database, drop_pg_database, make_key, wait_for_port
from tests.test_api import GOOD


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, broker_url):
    """Two `prefq api` processes, A and B, sharing a database, a storage folder and an API key."""
    url, name = create_pg_database()
    upgrade(url)
    root = tmp_path_factory.mktemp("replicas")
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text("{}")
    env = dict(
        os.environ,
        PREFQ_DATA_DIR=str(root / "data"),
        PREFQ_DATABASE_URL=url,
        PREFQ_MODEL_ROOTS=str(root),
        PREFQ_BROKER_URL=broker_url.rsplit("/", 1)[0] + "/6",
        PREFQ_API_KEY=make_key(url, "acme"),
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    stacks = [Stack(dict(env), tmp_path_factory.mktemp(f"logs-{n}")) for n in "ab"]
    for stack in stacks:
        stack.start("api", "api", "--port", str(stack.port))
    for stack in stacks:
        wait_for_port(stack.port, 60)
    yield *stacks, str(root / "model")
    for stack in stacks:
        stack.down()
        stack.http.close()
    drop_pg_database(name)


def test_a_file_deleted_through_one_replica_is_refused_by_the_other(replicas):
    a, b, model = replicas
    uploaded = a.http.post("/v1/files", files={"file": ("pairs.jsonl", GOOD)}, data={"purpose": "fine-tune"})
    file_id = uploaded.json()["id"]
    job = {"model": model, "dataset": file_id, "method": "dpo"}
    first = b.http.post("/jobs", json=job)  # B reads the file's row (and keeps what it keeps of it)
    assert first.status_code == 202, first.text
    assert b.http.post(f"/jobs/{first.json()['id']}/cancel").json()["status"] == "cancelled"
    deleted = a.http.delete(f"/v1/files/{file_id}")
    assert deleted.status_code == 200 and deleted.json()["deleted"], deleted.text

    again = b.http.post("/jobs", json=job)
    assert again.status_code == 422, f"B accepted a job on a deleted file: {again.text}"
    assert again.json()["error"]["code"] == "dataset_not_found"
    openai = b.http.post("/v1/fine_tuning/jobs", json={"model": model, "training_file": file_id})
    assert openai.status_code == 400 and openai.json()["error"]["param"] == "training_file", openai.text
    assert b.http.get(f"/v1/files/{file_id}").status_code == 404
