"""What a `model` names (`jobs.modelref`), what a tenant may name (`jobs.perimeter`), and the store queries of the
OpenAI face (metadata filter, events newest first, files in use), on SQLite and PostgreSQL."""

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from jobs import modelref
from jobs.db import upgrade
from jobs.models import JobStatus
from jobs.perimeter import Refused, confine
from tests.test_jobs_store import create, pg_store_url, store  # noqa: F401 - fixtures

JOB = "job_0192a3b4c5d6e7f8a9b0c"


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("Qwen/Qwen2.5-0.5B-Instruct", modelref.ModelRef("hub", "Qwen/Qwen2.5-0.5B-Instruct")),
        ("gpt2", modelref.ModelRef("hub", "gpt2")),
        ("org/name@v1.0", modelref.ModelRef("hub", "org/name", revision="v1.0")),
        ("org/name@refs/pr/3", modelref.ModelRef("hub", "org/name", revision="refs/pr/3")),
        (JOB, modelref.ModelRef("job", JOB)),
        (f"ft:org/name:alpha:chat:{JOB}", modelref.ModelRef("job", JOB)),
        (f"ft:org/name:alpha::{JOB}:ckpt-step-40", modelref.ModelRef("job", JOB, step=40)),
        ("s3://bucket/tenants/a/m/", modelref.ModelRef("path", "s3://bucket/tenants/a/m/")),
        ("/models/base", modelref.ModelRef("path", "/models/base")),
    ],
)
def test_what_a_model_names(ref, expected):
    assert modelref.parse(ref) == expected


@pytest.mark.parametrize(
    "ref",
    [
        "a/b/c",
        "org/na--me",
        "org/../x",
        "./base",
        "org/name@",
        "-org/name",
        "ft:x:y",
        f"ft:b:Alpha:s:{JOB}",
        "org name",
        "org/name@rev with space",
    ],
)
def test_what_names_nothing_is_refused_with_the_reason(ref):
    with pytest.raises(modelref.BadModelRef, match="not a"):
        modelref.parse(ref)


def test_fine_tuned_names_keep_the_first_base():
    first = modelref.fine_tuned_name("Qwen/Qwen2.5-0.5B@main", "alpha", "sft", JOB)
    assert first == f"ft:Qwen/Qwen2.5-0.5B:alpha:sft:{JOB}"
    assert (
        modelref.fine_tuned_name(first, "alpha", None, "job_2", 10) == "ft:Qwen/Qwen2.5-0.5B:alpha::job_2:ckpt-step-10"
    )
    assert modelref.fine_tuned_name("s3://b/tenants/alpha/models/base/", "alpha", "x", JOB).startswith("ft:base:")


def test_hub_ids_are_confined_to_the_operators_patterns():
    args = ("model", "alpha", "s3://b", [], [], True)
    assert confine("Qwen/Qwen2.5-0.5B", *args, ["Qwen/*"]) == "Qwen/Qwen2.5-0.5B"
    with pytest.raises(Refused, match="PREFQ_ALLOWED_HUB_MODELS"):
        confine("evil/model", *args, ["Qwen/*"])
    with pytest.raises(Refused, match="hub id"):
        confine("a/b/c", *args, ["*"])
    with pytest.raises(Refused):
        confine("Qwen/Qwen2.5-0.5B", "dataset", "alpha", "s3://b", [], [], False, ["*"])
    assert confine(f"ft:x:alpha:s:{JOB}", *args, []) == f"ft:x:alpha:s:{JOB}", "the caller checks the owner"


def test_one_resolver_reads_what_a_name_gives_a_tenant(tmp_path):
    """`modelref.resolve`, which the API, serve and the worker share: a succeeded job of the tenant's by id, fine-tuned
    name or complete checkpoint; a registered model by version, alias or (for a request) its bare name; hub ids and
    paths as they are; anything else one `ModelNotFound` naming the field and why."""
    from jobs import layout
    from jobs.db import make_engine, session
    from jobs.models import Job
    from jobs.registry import Registry
    from jobs.store import JobStore
    from storage import open_storage
    from training.spec import MANIFEST_NAME

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    engine, storage = make_engine(url), open_storage(f"file://{tmp_path / 'store'}")
    common = dict(tenant="alpha", method="dpo", trainer="basic", gpus=1, model="org/base", dataset_id="ds_x")
    result_uri = storage.uri(layout.model_prefix("alpha", "job_done"))
    rows = [
        Job(id="job_done", status=JobStatus.succeeded, result_uri=result_uri, **common),
        Job(id="job_busy", status=JobStatus.running, **common),
    ]
    with session(engine) as s:
        s.add_all(rows)
        s.commit()
        for row in rows:
            s.refresh(row)
    done = rows[0]
    storage.put_bytes(b"w", layout.checkpoint_prefix("alpha", done.id, 4) + "model.safetensors")
    storage.put_bytes(b"{}", layout.checkpoint_prefix("alpha", done.id, 4) + MANIFEST_NAME)
    storage.put_bytes(b"w", layout.checkpoint_prefix("alpha", done.id, 8) + "model.safetensors")  # no manifest yet
    registry = Registry(engine)
    registry.promote(done, "tiny", modelref.fine_tuned_name(done.model, "alpha", None, done.id), ["production"])

    def resolve(name, tenant="alpha", **kw):
        return modelref.resolve(name, tenant, JobStore(engine), registry, storage, MANIFEST_NAME, **kw)

    checkpoints = layout.list_checkpoints(storage, "alpha", done.id, MANIFEST_NAME)
    assert list(checkpoints) == [4] and checkpoints[4].keys[-1].endswith(MANIFEST_NAME), "step 8 is not complete"
    assert resolve(done.id).uri == done.result_uri
    assert resolve(done.id).fine_tuned_model == f"ft:org/base:alpha::{done.id}"
    ckpt = resolve(f"ft:base:alpha::{done.id}:ckpt-step-4")
    assert ckpt.uri == storage.uri(layout.checkpoint_prefix("alpha", done.id, 4)) and ckpt.ref.step == 4
    for name in ("models:/tiny", "models:/tiny/1", "models:/tiny@production", "tiny", "tiny@production"):
        found = resolve(name)
        assert (found.uri, found.job.id, found.version.version) == (done.result_uri, done.id, 1), name
    assert resolve("tiny", bare_names=False).ref == modelref.ModelRef("hub", "tiny"), "a job's row is pinned already"
    assert resolve("gpt2").ref.kind == "hub" and resolve("gpt2").uri is None
    assert resolve("s3://b/tenants/alpha/m/").uri == "s3://b/tenants/alpha/m/"
    for name, tenant, reason in [
        (done.id, "beta", "no fine-tuned model"),
        ("job_busy", "alpha", "job job_busy is running; its model can be named once it has succeeded"),
        (f"ft:base:alpha::{done.id}:ckpt-step-8", "alpha", "no checkpoint at step 8"),
        ("models:/tiny/2", "alpha", "the registered model tiny has no version 2"),
        ("tiny@staging", "alpha", "the registered model tiny has no alias 'staging'"),
        ("models:/other", "alpha", "other is not a registered model of this tenant's"),
        ("a/b/c", "alpha", "not a hub id"),
    ]:
        with pytest.raises(modelref.ModelNotFound, match=reason) as err:
            resolve(name, tenant)
        assert err.value.field == "model" and str(err.value).startswith("model: "), name


def test_a_refused_local_folder_names_the_setting_that_would_allow_it(tmp_path):
    """A newcomer's `--model ./my-model` outside the model roots: the answer says which setting lists them, and
    tells nothing of the folder itself (whether it exists)."""
    args = ("model", "alpha", "s3://b", [], [str(tmp_path / "roots")], True)
    with pytest.raises(Refused, match="PREFQ_MODEL_ROOTS") as refused:
        confine(str(tmp_path / "my-model"), *args)
    assert str(tmp_path) not in refused.value.message
    with pytest.raises(Refused) as refused:
        confine(str(tmp_path / "my-data.jsonl"), "dataset", "alpha", "s3://b", [], [str(tmp_path)], False)
    assert "PREFQ_MODEL_ROOTS" not in refused.value.message, "datasets are never local folders"


def test_metadata_filter_events_newest_first_and_files_in_use(store):  # noqa: F811
    a, _ = create(store, tenant="t", user_metadata={"team": "search", "run": "1"}, dataset_id="ds_a")
    b, _ = create(store, tenant="t", user_metadata={"team": "ads"}, eval_dataset_id="ds_a")
    c, _ = create(store, tenant="t", user_metadata={"team": "search", "run": "2"})
    assert [j.id for j in store.list_jobs(tenant="t", metadata={"team": "search"})[0]] == [c.id, a.id]
    assert [j.id for j in store.list_jobs(tenant="t", metadata={"team": "search", "run": "1"})[0]] == [a.id]
    page, more = store.list_jobs(tenant="t", metadata={"team": "search"}, limit=1)
    assert [j.id for j in page] == [c.id] and more
    assert store.list_jobs(tenant="t", metadata={"nope": "x"})[0] == []
    for step in (1, 2, 3):
        store.add_event(a.id, 1, "progress", {"step": step})
    assert [e.seq for e in store.events_before(a.id, None, 2)] == [4, 3]
    assert [e.seq for e in store.events_before(a.id, 3, 10)] == [2, 1]
    assert store.unfinished_using("ds_a") in (a.id, b.id)
    for job in (a, b):
        store.request_cancel(job.id)
    assert store.unfinished_using("ds_a") is None
    assert store.get_job(a.id).status == JobStatus.cancelled


class FakeHub(BaseHTTPRequestHandler):
    """The hub's model API as it answers: 200 for a model it has, 401 with X-Error-Code for one it has not (so as not
    to tell private repos apart), 404 for a revision it has not."""

    asked: list = []

    def do_GET(self):
        FakeHub.asked.append(self.path)
        if self.path in ("/api/models/prefq-test/there", "/api/models/prefq-test/there/revision/v1"):
            self.send_response(200)
        elif self.path.startswith("/api/models/prefq-test/there/revision/"):
            self.send_response(404)
            self.send_header("X-Error-Code", "RevisionNotFound")
        else:
            self.send_response(401)
            self.send_header("X-Error-Code", "RepositoryNotFound")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_the_api_asks_the_hub_where_it_can_and_checks_syntax_only_where_it_cannot(tmp_path, broker_url):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from cli.stack import free_port
    from settings import Settings

    server = HTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = Settings(
        data_dir=tmp_path,
        auth="off",
        broker_url=broker_url.rsplit("/", 1)[0] + "/6",
        hf_endpoint=f"http://127.0.0.1:{server.server_port}",
    )
    upgrade(settings.database_url)
    c = TestClient(create_app(settings))
    ds = c.post("/datasets", files={"file": ("p.jsonl", b'{"prompt": "Q", "chosen": "A", "rejected": "B"}\n')}).json()
    body = {"dataset": ds["id"], "method": "dpo", "gpus": 8, "trainer": "fsdp"}
    for model in ("prefq-test/there", "prefq-test/there@v1"):
        assert c.post("/jobs", json={**body, "model": model}).status_code == 202, model
    for model in ("prefq-test/absent", "prefq-test/there@nope"):
        r = c.post("/jobs", json={**body, "model": model})
        assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["field"]) == (
            422,
            "model_not_found",
            "model",
        ), model
        assert model in r.json()["error"]["message"]
    r = c.post(
        "/v1/fine_tuning/jobs",
        json={"model": "prefq-test/absent", "training_file": ds["id"], "method": {"type": "dpo"}},
    )
    assert (r.status_code, r.json()["error"]["param"]) == (400, "model")
    assert FakeHub.asked[-1] == "/api/models/prefq-test/absent"
    server.shutdown()

    offline = TestClient(create_app(settings.model_copy(update={"hf_hub_offline": True})))
    asked = len(FakeHub.asked)
    assert offline.post("/jobs", json={**body, "model": "prefq-test/absent"}).status_code == 202, "offline: syntax"
    assert len(FakeHub.asked) == asked
    unreachable = create_app(settings.model_copy(update={"hf_endpoint": f"http://127.0.0.1:{free_port()}"}))
    assert TestClient(unreachable).post("/jobs", json={**body, "model": "prefq-test/absent"}).status_code == 202
    assert unreachable.state.services.hub_down_until > 0, "not asked again for a while"
