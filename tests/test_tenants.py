"""Teams on one prefq, tried as an attacker inside the company would, on PostgreSQL: keys, tenants, references,
callbacks, limits and downloads. Every case of issue 10's "Why" is refused with an error that names the field."""

import json

import psycopg
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from cli.client import Client, ClientError
from jobs.db import make_engine
from jobs.models import Job, new_id
from jobs.store import JobStore
from queue_config import enqueue_job, make_celery
from settings import Settings
from storage import StorageError, get_dir, open_storage
from tests.services import make_key

GOOD = b'{"prompt": "Q1", "chosen": "A", "rejected": "B"}\n{"prompt": "Q2", "chosen": "A", "rejected": "B"}\n'


@pytest.fixture(scope="module")
def world(tmp_path_factory, broker_url, pg_template):
    from tests.services import create_pg_database, drop_pg_database

    url, name = create_pg_database(template=pg_template)
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("tenants"),
        database_url=url,
        callback_secret="s",
        broker_url=broker_url.rsplit("/", 1)[0] + "/5",
        model_roots=[str(tmp_path_factory.getbasetemp())],
        max_upload_bytes=200_000,
        max_line_bytes=20_000,
        tenant_max_active_jobs=3,
    )
    keys = {t: make_key(url, t) for t in ("alpha", "beta")} | {"admin": make_key(url, "ops", admin=True)}
    app = create_app(settings)
    clients = {t: TestClient(app, headers={"Authorization": f"Bearer {k}"}) for t, k in keys.items()}
    yield settings, clients, keys, app
    drop_pg_database(name)


def test_another_tenants_objects_answer_as_if_they_did_not_exist(world, micro_model):
    settings, c, keys, _ = world
    ds = c["alpha"].post("/datasets", files={"file": ("p.jsonl", GOOD)}).json()
    stored = open_storage(settings.storage_url).list("tenants/alpha/")
    assert ds["tenant"] == "alpha" and stored == [f"tenants/alpha/datasets/{ds['id']}.jsonl"], "under its prefix"
    job = (
        c["alpha"]
        .post(
            "/jobs",
            json={"model": str(micro_model), "dataset": ds["id"], "method": "dpo"},
            headers={"Idempotency-Key": "same"},
        )
        .json()
    )
    assert job["tenant"] == "alpha"
    for path in (
        f"/jobs/{job['id']}",
        f"/jobs/{job['id']}/events",
        f"/jobs/{job['id']}/checkpoints",
        f"/jobs/{job['id']}/model",
        f"/datasets/{ds['id']}",
    ):
        theirs, missing = c["beta"].get(path), c["beta"].get(path.replace(path.split("/")[2], "job_0000000000000"))
        assert theirs.status_code == 404 == missing.status_code, path
        assert theirs.json()["error"]["code"] == missing.json()["error"]["code"]
    for action in ("cancel", "retry"):
        assert c["beta"].post(f"/jobs/{job['id']}/{action}").status_code == 404
    assert c["beta"].get("/jobs").json()["data"] == [] and c["beta"].get("/datasets").json()["data"] == []
    # writes that name alpha's things: its dataset id, its storage, its idempotency key
    body = {"model": str(micro_model), "dataset": ds["id"], "method": "dpo"}
    r = c["beta"].post("/jobs", json=body)
    assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["field"]) == (
        422,
        "dataset_not_found",
        "dataset",
    )
    stored = f"{settings.storage_url}/tenants/alpha/datasets/{ds['id']}.jsonl"
    r = c["beta"].post("/jobs", json={**body, "dataset": stored})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "reference_not_allowed")
    mine = c["beta"].post("/datasets", files={"file": ("p.jsonl", GOOD)}).json()
    again = c["beta"].post("/jobs", json={**body, "dataset": mine["id"]}, headers={"Idempotency-Key": "same"}).json()
    assert again["id"] != job["id"] and again["tenant"] == "beta"
    # the admin sees every tenant, and one on asking
    everyone = {j["tenant"] for j in c["admin"].get("/jobs").json()["data"]}
    assert everyone == {"alpha", "beta"}
    assert {j["tenant"] for j in c["admin"].get("/jobs", params={"tenant": "beta"}).json()["data"]} == {"beta"}
    assert c["admin"].get(f"/jobs/{job['id']}").status_code == 200
    # workers and keys are the admin's
    assert c["alpha"].get("/workers").status_code == 403 and c["admin"].get("/workers").status_code == 200
    assert c["alpha"].post("/keys", json={"tenant": "alpha"}).status_code == 403
    for jid in (job["id"], again["id"]):
        c["admin"].post(f"/jobs/{jid}/cancel")


def test_keys_are_hashed_bearer_only_and_revocable(world):
    settings, c, keys, app = world
    created = c["admin"].post("/keys", json={"tenant": "gamma", "label": "ci"}).json()
    key = created["key"]
    assert created["id"] in key and created["tenant"] == "gamma"
    gamma = TestClient(app, headers={"Authorization": f"Bearer {key}"})
    assert gamma.get("/jobs").status_code == 200
    assert TestClient(app, headers={"Authorization": key}).get("/jobs").status_code == 401, "no Bearer, no entry"
    assert TestClient(app, headers={"Authorization": f"Basic {key}"}).get("/jobs").status_code == 401
    assert TestClient(app).get("/jobs").status_code == 401
    assert TestClient(app, headers={"Authorization": "Bearer "}).get("/jobs").status_code == 401
    listed = c["admin"].get("/keys", params={"tenant": "gamma"}).json()["data"]
    assert [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0] and listed[0]["last_used_at"]
    with psycopg.connect(settings.database_url.replace("+psycopg", "")) as conn:
        dump = json.dumps(
            [
                row
                for table in ("api_keys", "jobs", "job_events", "datasets")
                for row in conn.execute(f"SELECT * FROM {table}").fetchall()
            ],
            default=str,
        )
    for k in (*keys.values(), key):
        assert k not in dump and k.split("_", 2)[2] not in dump, "no key text in the database"
    assert c["admin"].post(f"/keys/{created['id']}/revoke").json()["revoked_at"]
    r = gamma.get("/jobs")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


def test_an_empty_key_setting_does_not_turn_authentication_off(world):
    settings, *_ = world
    open_door = create_app(settings.model_copy(update={"api_key": ""}))
    assert TestClient(open_door).get("/jobs").status_code == 401
    laptop = create_app(settings.model_copy(update={"auth": "off"}))
    assert TestClient(laptop).get("/jobs").status_code == 200, "only PREFQ_AUTH=off opens it"


@pytest.mark.parametrize(
    ("field", "ref"),
    [
        ("dataset", "file:///etc/passwd"),
        ("dataset", "file:///proc/self/environ"),
        ("dataset", "file:///root/.bashrc"),
        ("dataset", "file:///etc/no-such-file"),
        ("dataset", "s3://other-bucket/secret.jsonl"),
        ("dataset", "../../etc/passwd"),
        ("eval_dataset", "file:///etc/passwd"),
        ("model", "/etc"),
        ("model", "/usr/lib/python3"),
        ("model", "/no/such/model"),
        ("model", "s3://other-bucket/m/"),
        ("model", "file:///etc/"),
    ],
)
def test_references_outside_the_tenants_reach_are_refused_without_telling_if_they_exist(world, micro_model, field, ref):
    _, c, *_ = world
    ds = c["alpha"].post("/datasets", files={"file": ("p.jsonl", GOOD)}).json()["id"]
    body = {"model": str(micro_model), "dataset": ds, "method": "dpo", field: ref}
    r = c["alpha"].post("/jobs", json=body)
    error = r.json()["error"]
    assert (r.status_code, error["code"], error["field"]) == (422, "reference_not_allowed", field)
    assert "exist" not in error["message"] and "no such" not in error["message"].lower()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/hook",
        "http://localhost:6379/",
        "http://[::1]:5432/",
        "http://2130706433/hook",
        "http://user:pass@example.com/hook",
        "ftp://example.com/hook",
        "http://metadata.google.internal.invalid/",
    ],
)
def test_callback_urls_that_reach_inside_are_refused(world, micro_model, url):
    _, c, *_ = world
    ds = c["alpha"].post("/datasets", files={"file": ("p.jsonl", GOOD)}).json()["id"]
    r = c["alpha"].post("/jobs", json={"model": str(micro_model), "dataset": ds, "method": "dpo", "callback_url": url})
    assert r.status_code == 422 and r.json()["error"]["field"] == "callback_url", r.text
    assert "pass" not in json.dumps([j.get("callback_url") for j in c["alpha"].get("/jobs").json()["data"]])


def test_limits_name_themselves(world, micro_model):
    settings, c, *_ = world
    big = GOOD * 3000  # above max_upload_bytes (200 kB)
    r = c["alpha"].post("/datasets", files={"file": ("big.jsonl", big)})
    assert r.status_code == 413 and "PREFQ_MAX_UPLOAD_BYTES" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the body is cut off as soon as it passes the limit
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jsonl"\r\n\r\n'
        for _ in range(300):
            yield GOOD * 20

    r = c["alpha"].post("/datasets", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    long_line = b'{"prompt": "' + b"x" * 30_000 + b'", "chosen": "a", "rejected": "b"}\n'
    bad = {
        "line_bytes": (GOOD + long_line, 3, "-", "longer than the limit of 20000"),
        "depth": (
            GOOD + b'{"prompt": ' + b"[" * 40 + b"]" * 40 + b', "chosen": "a", "rejected": "b"}\n',
            3,
            "-",
            "deeper",
        ),
        "surrogate": (GOOD + b'{"prompt": "Q", "chosen": "\\ud800", "rejected": "b"}\n', 3, "chosen", "surrogate"),
        "nul": (GOOD + b'{"prompt": "Q\\u0000", "chosen": "a", "rejected": "b"}\n', 3, "prompt", "NUL"),
    }
    for name, (data, line, field, reason) in bad.items():
        r = c["alpha"].post("/datasets", files={"file": (f"{name}.jsonl", data)})
        assert r.status_code == 422, (name, r.text)
        (detail,) = r.json()["error"]["details"]
        assert (detail["line"], detail["field"]) == (line, field) and reason in detail["reason"], (name, detail)
    ds = c["alpha"].post("/datasets", files={"file": ("p.jsonl", GOOD)}).json()["id"]
    body = {"model": str(micro_model), "dataset": ds, "method": "dpo"}
    for name, value in (("max_steps", 10**7), ("max_length", 10**6), ("epochs", 1000), ("batch_size", 10**5)):
        r = c["alpha"].post("/jobs", json={**body, "hyperparameters": {name: value}})
        assert (r.status_code, r.json()["error"]["field"]) == (422, f"hyperparameters.{name}")
        assert "PREFQ_MAX_JOB_" in r.json()["error"]["message"]
    store = JobStore(make_engine(settings.database_url))
    active = store.count_unfinished("alpha")
    made = [c["alpha"].post("/jobs", json=body).json()["id"] for _ in range(max(0, 3 - active))]
    r = c["alpha"].post("/jobs", json=body)
    assert r.status_code == 429 and r.headers["Retry-After"] and "PREFQ_TENANT_MAX_ACTIVE_JOBS" in r.text
    assert (
        c["beta"]
        .post(
            "/jobs",
            json={**body, "dataset": c["beta"].post("/datasets", files={"file": ("p.jsonl", GOOD)}).json()["id"]},
        )
        .status_code
        == 202
    ), "per tenant"
    for jid in made + [j["id"] for j in c["admin"].get("/jobs").json()["data"]]:
        c["admin"].post(f"/jobs/{jid}/cancel")


def test_downloads_never_leave_their_folder(tmp_path, s3):
    client = Client("http://127.0.0.1:9")
    (tmp_path / "src").write_text("secret")
    for name in ("../escape", "/etc/cron.d/x", "a/../../b", ""):
        with pytest.raises(ClientError):
            client.download(
                [
                    {"name": "ok.txt", "url": f"file://{tmp_path / 'src'}"},
                    {"name": name, "url": f"file://{tmp_path / 'src'}"},
                ],
                tmp_path / "out",
            )
        assert not (tmp_path / "out").exists(), "nothing written before the check"

    # AWS S3 stores keys such as `jobs/x/../../.bashrc` or `jobs/x//etc/cron.d/y` as they are (SeaweedFS, the test
    # server, refuses or normalises them), so get_dir meets them through a listing like this one:
    class Hostile:
        def __init__(self, keys):
            self.keys, self.written = keys, []

        def list(self, prefix=""):
            return self.keys

        def get_file(self, key, local):
            self.written.append(local)

        def uri(self, key):
            return f"s3://b/{key}"

    for evil in ("hostile/../../escape", "hostile//etc/cron.d/x", "hostile/a/../../../b"):
        storage = Hostile(["hostile/ok.txt", evil])
        with pytest.raises(StorageError, match="would leave"):
            get_dir(storage, "hostile/", tmp_path / "got")
        assert storage.written == [], "nothing fetched before every key is checked"
    real = open_storage(
        f"s3://{s3['bucket']}",
        endpoint_url=s3["endpoint_url"],
        access_key_id=s3["access_key_id"],
        secret_access_key=s3["secret_access_key"],
    )
    real.put_bytes(b"fine", "contained/sub/ok.txt")
    assert get_dir(real, "contained/", tmp_path / "got") == ["contained/sub/ok.txt"]
    assert (tmp_path / "got" / "sub" / "ok.txt").read_bytes() == b"fine"


def test_the_worker_checks_references_again_and_the_run_gets_no_secrets(stack, micro_model, toy_dpo):
    """A job row that names /etc/passwd (as if written past the API) fails as the user's error; a real run's
    environment holds none of the worker's secrets."""
    env = stack.env
    store = JobStore(make_engine(env["PREFQ_DATABASE_URL"]))
    sneaky = Job(
        id=new_id("job"), method="dpo", trainer="basic", gpus=1, model=str(micro_model), dataset_id="file:///etc/passwd"
    )
    store.create_jobs([(sneaky, [])])
    enqueue_job(make_celery(Settings(broker_url=env["PREFQ_BROKER_URL"])), sneaky.id, 1, 1)
    failed = stack.wait_for(sneaky.id, {"failed", "succeeded"}, timeout_s=120)
    assert failed["status"] == "failed" and failed["error"]["code"] == "reference_not_allowed"
    assert failed["error"]["user_error"] is True

    from tests.services import submit

    job_id = submit(stack, micro_model, toy_dpo, "--set", "max_steps=5000", "--set", "eval_fraction=0")
    pid = stack.wait_for_event(job_id, "launched")["data"]["pid"]
    stack.wait_for_event(job_id, "progress")
    environ = dict(item.split("=", 1) for item in open(f"/proc/{pid}/environ").read().split("\0") if "=" in item)
    leaked = {k for k in environ if k.startswith("PREFQ_")} | {
        k
        for k, v in environ.items()
        if v in (env["PREFQ_S3_SECRET_ACCESS_KEY"], env["PREFQ_CALLBACK_SECRET"], env["PREFQ_API_KEY"])
    }
    assert not leaked and "postgresql" not in json.dumps(environ)
    stack.http.post(f"/jobs/{job_id}/cancel")
    stack.wait_for(job_id, {"cancelled"}, timeout_s=120)
