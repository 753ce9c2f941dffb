"""The model registry (`jobs.registry`, `/models`, `prefq models`) and a registered name as a job's model.

In-process: the API (TestClient) on SQLite with a real broker keyspace that no worker reads, over job rows a fixture
writes as succeeded; the registry's version numbering under concurrent promotes on PostgreSQL. On real processes:
`tests/test_samples.py` trains, promotes and trains again on the promoted name."""

from __future__ import annotations

import threading

import pytest

from jobs import modelref
from jobs.db import make_engine, session, upgrade
from jobs.models import Job, JobStatus, new_id
from jobs.registry import Registry, RegistryError
from jobs.store import JobStore
from tests.test_api import job_body, keyed


def succeeded_job(engine, tenant: str, model: str = "/models/base", suffix: str | None = None) -> Job:
    """A job row as a worker leaves it when the job succeeded (the registry reads nothing else of it)."""
    job = Job(
        id=new_id("job"),
        tenant=tenant,
        method="dpo",
        trainer="basic",
        gpus=1,
        model=model,
        dataset_id="ds_x",
        hyperparameters={},
        status=JobStatus.succeeded,
        suffix=suffix,
        result_uri=f"file:///store/tenants/{tenant}/jobs/x/model/",
        eval_metrics={"eval_loss": 0.5},
        metrics={"loss": 0.6},
    )
    with session(engine) as s:
        s.add(job)
        s.commit()
        s.refresh(job)
    return job


@pytest.mark.parametrize(
    "ref, kind, value, alias, version",
    [
        ("models:/tiny", "registered", "tiny", None, None),
        ("models:/tiny/12", "registered", "tiny", None, 12),
        ("models:/tiny@production", "registered", "tiny", "production", None),
        ("tiny", "hub", "tiny", None, None),
    ],
)
def test_registered_references_parse(ref, kind, value, alias, version):
    parsed = modelref.parse(ref)
    assert (parsed.kind, parsed.value, parsed.revision, parsed.step) == (kind, value, alias, version)


@pytest.mark.parametrize(
    "ref", ["models:/", "models:/a/0", "models:/a@Prod", "models:/a/b/c", "models:/../x", "models:/a@"]
)
def test_bad_registered_references_say_the_forms(ref):
    with pytest.raises(modelref.BadModelRef, match="models:/NAME"):
        modelref.parse(ref)


def test_versions_count_up_and_aliases_move(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    upgrade(url)
    engine = make_engine(url)
    registry = Registry(engine)
    first, second = succeeded_job(engine, "acme"), succeeded_job(engine, "acme")
    v1 = registry.promote(first, "tiny", "ft:a", ["production"])
    v2 = registry.promote(second, "tiny", "ft:b", ["staging"])
    assert (v1.version, v2.version) == (1, 2)
    assert registry.aliases("acme", "tiny") == {"production": 1, "staging": 2}
    registry.set_alias("acme", "tiny", "production", 2)
    assert registry.resolve("acme", "tiny", alias="production").fine_tuned_model == "ft:b"
    assert registry.resolve("acme", "tiny").version == 2  # newest
    assert registry.resolve("acme", "tiny", version=1).job_id == first.id
    assert registry.resolve("other", "tiny") is None  # names are per tenant
    with pytest.raises(RegistryError, match="no version 7"):
        registry.set_alias("acme", "tiny", "production", 7)
    with pytest.raises(RegistryError, match="name"):
        registry.promote(first, "../up", "ft:a")
    assert registry.delete_alias("acme", "tiny", "staging") and not registry.delete_alias("acme", "tiny", "staging")


def test_concurrent_promotes_get_distinct_versions_on_postgres(pg_url):
    upgrade(pg_url)
    engine = make_engine(pg_url)
    registry = Registry(engine)
    jobs = [succeeded_job(engine, "race") for _ in range(6)]
    name = f"race-{jobs[0].id[-6:]}"
    barrier, got, errors = threading.Barrier(len(jobs)), [], []

    def promote(job):
        barrier.wait()
        try:
            got.append(registry.promote(job, name, f"ft:{job.id}").version)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(got) == list(range(1, len(jobs) + 1))


@pytest.fixture
def acme(settings):
    return keyed(settings, "acme")


def test_promote_list_show_and_alias_over_http(settings, acme):
    engine = make_engine(settings.database_url)
    job = succeeded_job(engine, "acme", suffix="v1")
    answer = acme.post(
        "/models/tiny-dpo/versions", json={"job_id": job.id, "aliases": ["production"], "description": "first"}
    )
    assert answer.status_code == 201, answer.text
    v1 = answer.json()
    assert (v1["version"], v1["model"], v1["aliases"]) == (1, "models:/tiny-dpo/1", ["production"])
    assert v1["fine_tuned_model"] == modelref.fine_tuned_name(job.model, "acme", "v1", job.id)
    assert v1["metrics"] == {"train": {"loss": 0.6}, "eval": {"eval_loss": 0.5}}
    v2 = acme.post("/models/tiny-dpo/versions", json={"job_id": succeeded_job(engine, "acme").id}).json()
    assert v2["version"] == 2 and v2["aliases"] == []
    listed = acme.get("/models").json()["data"]
    assert [(m["name"], m["latest_version"], m["aliases"]) for m in listed] == [("tiny-dpo", 2, {"production": 1})]
    moved = acme.put("/models/tiny-dpo/aliases/production", json={"version": 2}).json()
    assert moved["aliases"] == {"production": 2}
    assert [(v["version"], v["aliases"]) for v in moved["versions"]] == [(2, ["production"]), (1, [])]
    assert acme.get("/models/tiny-dpo/versions/1").json()["description"] == "first"
    assert acme.delete("/models/tiny-dpo/aliases/production").status_code == 204
    assert acme.get("/models/tiny-dpo").json()["aliases"] == {}


def test_registry_refusals_name_the_field(settings, acme):
    engine = make_engine(settings.database_url)
    mine, theirs = succeeded_job(engine, "acme"), succeeded_job(engine, "globex")
    queued = Job(
        id="job_queued1",
        tenant="acme",
        method="dpo",
        trainer="basic",
        gpus=1,
        model="/m",
        dataset_id="d",
        hyperparameters={},
    )
    with session(engine) as s:
        s.add(queued)
        s.commit()
    cases = [
        (acme.post("/models/m/versions", json={"job_id": theirs.id}), 404, "job_id"),  # another tenant's job
        (acme.post("/models/m/versions", json={"job_id": "job_nosuch"}), 404, "job_id"),
        (acme.post("/models/m/versions", json={"job_id": "job_queued1"}), 409, "job_id"),
        (acme.post("/models/m/versions", json={"job_id": mine.id, "aliases": ["Prod!"]}), 422, "aliases.0"),
        (acme.post("/models/m/versions", json={"job_id": mine.id, "extra": 1}), 422, "extra"),
        (acme.post("/models/-bad/versions", json={"job_id": mine.id}), 422, "name"),
    ]
    for answer, status, field in cases:
        assert answer.status_code == status, answer.text
        assert answer.json()["error"]["field"] == field, answer.text
    assert acme.post("/models/m/versions", json={"job_id": mine.id}).status_code == 201
    assert acme.put("/models/m/aliases/production", json={"version": 5}).status_code == 404
    other = keyed(settings, "globex")
    assert other.get("/models/m").status_code == 404  # another tenant's name: as if it did not exist
    assert other.get("/models").json()["data"] == []
    assert other.put("/models/m/aliases/production", json={"version": 1}).status_code == 404


def test_a_registered_name_is_a_jobs_model_pinned_to_its_version(settings, acme, micro_model):
    engine = make_engine(settings.database_url)
    first, second = succeeded_job(engine, "acme"), succeeded_job(engine, "acme")
    ft = [modelref.fine_tuned_name(j.model, "acme", None, j.id) for j in (first, second)]
    acme.post("/models/tiny/versions", json={"job_id": first.id, "aliases": ["production"]})
    acme.post("/models/tiny/versions", json={"job_id": second.id})
    ds = acme.post("/datasets", files={"file": ("p.jsonl", b'{"prompt": "Q", "chosen": "A", "rejected": "B"}\n')})
    ds = ds.json()["id"]
    for ref, expected in [
        ("models:/tiny@production", ft[0]),
        ("tiny@production", ft[0]),
        ("models:/tiny/2", ft[1]),
        ("tiny", ft[1]),
        ("models:/tiny", ft[1]),
    ]:
        answer = acme.post("/jobs", json=job_body(ref, ds))
        assert answer.status_code == 202, answer.text
        job = answer.json()
        assert job["model"] == expected, ref
        events = {e.type: e.data for e in JobStore(engine).events_after(job["id"])}
        assert events["registered_model"]["requested"] == ref
    for ref, message in [
        ("models:/nosuch", "not a registered model"),
        ("tiny@canary", "no alias 'canary'"),
        ("models:/tiny/9", "no version 9"),
    ]:
        answer = acme.post("/jobs", json=job_body(ref, ds))
        assert answer.status_code == 422 and answer.json()["error"]["field"] == "model", answer.text
        assert message in answer.json()["error"]["message"]
    # another tenant's registered name is not a name here: a bare one reads as a hub id, models:/ is refused
    other = keyed(settings, "globex")
    ds2 = other.post("/datasets", files={"file": ("p.jsonl", b'{"prompt": "Q", "chosen": "A", "rejected": "B"}\n')})
    answer = other.post("/jobs", json=job_body("models:/tiny", ds2.json()["id"]))
    assert answer.status_code == 422 and "not a registered model" in answer.json()["error"]["message"]


def test_v1_models_lists_registered_versions_and_aliases(settings, acme):
    job = succeeded_job(make_engine(settings.database_url), "acme")
    acme.post("/models/tiny/versions", json={"job_id": job.id, "aliases": ["production"]})
    ids = [m["id"] for m in acme.get("/v1/models").json()["data"]]
    assert "models:/tiny/1" in ids and "models:/tiny@production" in ids
    assert acme.get("/v1/models/models:/tiny@production").json()["owned_by"] == "acme"
    assert "models:/tiny/1" not in [m["id"] for m in keyed(settings, "globex").get("/v1/models").json()["data"]]
