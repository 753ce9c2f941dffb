"""The dashboard's perimeter, tried as an attacker would, over HTTP: sessions, CSRF, tenants, bad input. The
pages run on a real app and PostgreSQL; the browser test (`test_ui.py`) drives the whole stack."""

import re
import tomllib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.ui import session as ui_session
from jobs.keys import KeyStore
from jobs.models import Job, JobStatus, new_id
from settings import Settings
from tests.services import ROOT, create_pg_database, drop_pg_database, make_key

GOOD = b'{"prompt": "Q1", "chosen": "A", "rejected": "B"}\n{"prompt": "Q2", "chosen": "A", "rejected": "B"}\n'


@pytest.fixture(scope="module")
def world(tmp_path_factory, pg_template):
    models = tmp_path_factory.mktemp("models")
    (models / "m").mkdir()
    (models / "m" / "config.json").write_text("{}")
    url, name = create_pg_database(template=pg_template)
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("ui"),
        database_url=url,
        broker_url="redis://127.0.0.1:9/0",
        model_roots=[str(models)],
    )
    keys = {t: make_key(settings.database_url, t) for t in ("alpha", "beta")}
    app = create_app(settings)
    store = app.state.services.store
    job = Job(
        id=new_id("job"),
        tenant="alpha",
        method="dpo",
        trainer="basic",
        gpus=1,
        model="m",
        dataset_id="ds_1",
        user_metadata={"team": "search"},
    )
    store.create_jobs([(job, [("queued", {"queue": "gpu1"})])])
    yield settings, app, keys, job.id, str(models / "m")
    drop_pg_database(name)


def signed_in(app, key: str) -> tuple[TestClient, str]:
    client = TestClient(app)
    r = client.post("/ui/login", data={"key": key, "next": "/ui/new"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/new"
    page = client.get("/ui/new")
    return client, re.search(r'name="csrf" value="([0-9a-f]+)"', page.text).group(1)


def test_sign_in_gives_an_httponly_cookie_that_holds_no_key(world):
    _, app, keys, *_ = world
    client = TestClient(app)
    r = client.get("/ui/jobs?status=running", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/login?next=%2Fui%2Fjobs%3Fstatus%3Drunning"
    r = client.post("/ui/login", data={"key": keys["alpha"]}, follow_redirects=False)
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/ui" in cookie
    secret = keys["alpha"].split("_", 2)[2]  # pq_<id>_<secret>; the secret may hold "_" itself
    assert keys["alpha"] not in cookie and secret not in cookie
    assert r.headers["location"] == "/ui/jobs"
    assert client.get("/ui/jobs").status_code == 200
    headers = client.get("/ui/jobs").headers
    assert headers["x-frame-options"] == "DENY" and headers["cache-control"] == "no-store"


def test_bad_keys_foreign_origins_and_forged_cookies_get_no_session(world):
    _, app, keys, *_ = world
    client = TestClient(app)
    r = client.post("/ui/login", data={"key": keys["alpha"][:-1] + "x"})
    assert r.status_code == 401 and "not valid" in r.text and "set-cookie" not in r.headers
    r = client.post("/ui/login", data={"key": keys["alpha"]}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "set-cookie" not in r.headers, "no login CSRF"
    r = client.post("/ui/login", data={"key": keys["alpha"], "next": "https://evil.example/"}, follow_redirects=False)
    assert r.headers["location"] == "/ui/jobs", "no open redirect"
    value = r.cookies["prefq_session"]
    key_id, expires, mac = value.split(".")
    for forged in (
        f"{key_id}.{int(expires) + 99}.{mac}",
        f"{key_id}.{expires}.{'0' * 64}",
        "garbage",
        f"{key_id}.1.{mac}",
    ):
        other = TestClient(app, cookies={"prefq_session": forged})
        assert other.get("/ui/jobs", follow_redirects=False).status_code == 303, forged
    fragment = TestClient(app).get("/ui/jobs/rows", headers={"HX-Request": "true"})
    assert fragment.status_code == 204 and fragment.headers["HX-Redirect"] == "/ui/login"


def test_a_revoked_key_ends_its_sessions(world):
    settings, app, *_ = world
    key = make_key(settings.database_url, "alpha")
    client, _ = signed_in(app, key)
    KeyStore(app.state.services.store.engine).revoke(key.split("_")[1])
    ui_session.forget(key.split("_")[1])  # what the 5 s row cache would do by itself
    assert client.get("/ui/jobs", follow_redirects=False).status_code == 303


def test_state_changes_need_this_sessions_csrf_token(world):
    _, app, keys, job_id, _ = world
    alpha, token = signed_in(app, keys["alpha"])
    _, beta_token = signed_in(app, keys["beta"])
    assert token != beta_token
    for sent in ({}, {"csrf": beta_token}, {"csrf": ""}):
        r = alpha.post(f"/ui/jobs/{job_id}/cancel", data=sent)
        assert r.status_code == 403 and "CSRF" in r.text, sent
    r = alpha.post("/ui/datasets", files={"file": ("p.jsonl", GOOD)})
    assert r.status_code == 403
    assert alpha.post("/ui/logout").status_code == 403
    r = alpha.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": token}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403, "another site's POST, even with a token"
    r = alpha.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": token}, follow_redirects=False)
    assert r.status_code == 303 and app.state.services.store.get_job(job_id).status == "cancelled"
    r = alpha.post(f"/ui/jobs/{job_id}/cancel", headers={"X-CSRF-Token": token})
    assert r.status_code == 409 and "already cancelled" in r.text


def test_another_tenants_job_answers_404_everywhere(world):
    _, app, keys, job_id, _ = world
    beta, token = signed_in(app, keys["beta"])
    missing = "job_0000000000000"
    for path in (
        f"/ui/jobs/{job_id}",
        f"/ui/jobs/{job_id}/panel",
        f"/ui/jobs/{job_id}/stream",
        f"/ui/jobs/{job_id}/files/model/config.json",
        f"/ui/compare?ids={job_id}",
    ):
        theirs, nothing = beta.get(path), beta.get(path.replace(job_id, missing))
        assert theirs.status_code == 404 == nothing.status_code, path
        assert theirs.text.replace(job_id, missing) == nothing.text, "the same answer as for no job"
    for action in ("cancel", "retry"):
        assert beta.post(f"/ui/jobs/{job_id}/{action}", data={"csrf": token}).status_code == 404
    assert job_id not in beta.get("/ui/jobs").text and job_id not in beta.get("/ui/jobs?q=search").text
    assert beta.get("/ui/workers").status_code == 403
    alpha, _ = signed_in(app, keys["alpha"])
    assert job_id in alpha.get("/ui/jobs?q=search").text, "search finds metadata values"
    assert job_id in alpha.get(f"/ui/jobs?q={job_id[-8:]}").text and job_id not in alpha.get("/ui/jobs?q=zz_%").text
    assert alpha.get("/ui/jobs?q=%00").status_code == 422, "a NUL never reaches PostgreSQL (`api.text`)"


def test_bad_input_gets_a_page_naming_the_field_never_a_500(world):
    _, app, keys, job_id, model = world
    alpha, token = signed_in(app, keys["alpha"])
    cases = {
        "/ui/jobs?status=bogus": (422, "status"),
        "/ui/jobs?after=a/b": (422, "after"),
        "/ui/compare?ids=..%2Fx": (422, "ids"),
        f"/ui/jobs/{job_id}/files/checkpoints/%2e%2e/%2e%2e/x": (404, "No file"),
        f"/ui/jobs/{job_id}/files/other/x": (404, "No file"),
        "/ui/datasets?after=%00": (422, "after"),
    }
    for path, (status, text) in cases.items():
        r = alpha.get(path)
        assert (r.status_code, text in r.text) == (status, True), path
    r = alpha.post(
        "/ui/datasets", files={"file": ("bad.jsonl", b'{"prompt": "Q", "chosen": 1}\n')}, data={"csrf": token}
    )
    assert r.status_code == 200 and "nothing was stored" in r.text and "<td>chosen</td>" in r.text
    ds = alpha.post("/ui/datasets", files={"file": ("p.jsonl", GOOD)}, data={"csrf": token})
    dataset_id = re.search(r'id="new-dataset">(ds_\w+)', ds.text).group(1)
    form = {"csrf": token, "dataset": dataset_id, "model": model, "method": "dpo", "gpus": "1"}
    for extra, field in (
        ({"gpus": "two"}, "gpus"),
        ({"hp.batch_size": "x"}, "hyperparameters.batch_size"),
        ({"hp.beta": "-1"}, "beta"),
        ({"method": "ppo"}, "method"),
        ({"metadata": "novalue"}, "metadata"),
        ({"model": "/nowhere"}, "model"),
        ({"hp.max_steps": "0"}, "max_steps"),
        ({"hp.learning_rate": "inf"}, "hyperparameters.learning_rate"),
    ):
        r = alpha.post("/ui/jobs", data={**form, **extra})
        assert r.status_code == 422 and field in re.search(r'id="form-error"[^>]*>([^<]*)', r.text).group(1), extra


def test_a_failed_job_shows_its_error_whose_fault_and_a_retry_button(world):
    _, app, keys, *_ = world
    store = app.state.services.store
    failed = {}
    for user_error in (True, False):
        job = Job(
            id=new_id("job"),
            tenant="alpha",
            method="dpo",
            trainer="basic",
            gpus=1,
            model="m",
            dataset_id="ds_1",
            status=JobStatus.failed,
            error_code="invalid_data" if user_error else "oom_killed",
            error_message="line 3: <chosen> is empty",
            error_is_user=user_error,
        )
        store.create_jobs([(job, [])])
        failed[user_error] = job.id
    alpha, _ = signed_in(app, keys["alpha"])
    page = alpha.get(f"/ui/jobs/{failed[True]}").text
    assert "invalid_data" in page and "line 3: &lt;chosen&gt; is empty" in page, "escaped, not markup"
    assert "Fault: <strong>yours</strong>" in page and 'id="retry"' in page and 'id="cancel"' not in page
    page = alpha.get(f"/ui/jobs/{failed[False]}/panel").text
    assert "the infrastructure" in page and page.startswith('<div id="panel" data-status="failed"')
    assert (
        "failed" in alpha.get("/ui/jobs?status=failed").text
        and failed[True] in alpha.get("/ui/jobs?status=failed").text
    )
    assert failed[True] not in alpha.get("/ui/jobs?status=running").text


def test_the_job_page_shows_what_max_length_cut_and_dropped(world):
    _, app, keys, *_ = world
    lengths = {
        "train": {"rows": 450, "truncated": 20, "dropped": 30, "max_length": 40, "p50": 18, "p95": 70, "max": 90},
        "eval": {"rows": 50, "truncated": 0, "dropped": 0, "max_length": 40, "p50": 17, "p95": 22, "max": 25},
    }
    job = Job(id=new_id("job"), tenant="alpha", method="dpo", trainer="basic", gpus=1, model="m", dataset_id="ds_1")
    job.lengths = lengths
    app.state.services.store.create_jobs([(job, [])])
    alpha, _ = signed_in(app, keys["alpha"])
    assert (
        alpha.get(f"/jobs/{job.id}", headers={"Authorization": f"Bearer {keys['alpha']}"}).json()["lengths"] == lengths
    )
    panel = alpha.get(f"/ui/jobs/{job.id}/panel").text
    row = panel.split('<tr class="lengths-train">', 1)[1].split("</tr>", 1)[0]
    assert row == '<th>train</th><td>450</td><td>20</td><td class="warn">30</td><td>40</td><td>18 / 70 / 90</td>'
    assert panel.index("lengths-train") < panel.index("lengths-eval")


def test_the_jobs_list_pages_newest_first(world):
    settings, app, *_ = world
    store = app.state.services.store
    ids = []
    for n in range(27):
        job = Job(
            id=new_id("job"),
            tenant="gamma",
            method="sft",
            trainer="basic",
            gpus=1,
            model="m",
            dataset_id="d",
            user_metadata={"n": str(n)},
        )
        store.create_jobs([(job, [])])
        ids.append(job.id)
    gamma, _ = signed_in(app, make_key(settings.database_url, "gamma"))
    first = gamma.get("/ui/jobs").text
    shown = re.findall(r'<tr id="row-(job_\w+)"', first)
    newest = sorted(ids, reverse=True)  # ids are time-ordered (by millisecond, then at random)
    assert shown == newest[:25]
    older = re.search(r'href="(/ui/jobs\?[^"]*after=job_\w+)"', first).group(1).replace("&amp;", "&")
    assert re.findall(r'<tr id="row-(job_\w+)"', gamma.get(older).text) == newest[25:]
    assert re.findall(r'<tr id="row-(job_\w+)"', gamma.get("/ui/jobs/rows", params={"q": '"n": "3"'}).text) == [ids[3]]


def test_without_auth_there_is_no_sign_in_and_other_sites_still_cannot_post(world):
    settings, *_ = world
    app = create_app(settings.model_copy(update={"auth": "off"}))
    job = Job(id=new_id("job"), method="dpo", trainer="basic", gpus=1, model="m", dataset_id="ds_1")
    app.state.services.store.create_jobs([(job, [])])
    client = TestClient(app)
    page = client.get("/ui/jobs")
    assert page.status_code == 200 and job.id in page.text and "Sign out" not in page.text
    r = client.post(f"/ui/jobs/{job.id}/cancel", headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and app.state.services.store.get_job(job.id).status == "queued"
    r = client.post(f"/ui/jobs/{job.id}/cancel", headers={"Origin": "http://testserver"}, follow_redirects=False)
    assert r.status_code == 303 and app.state.services.store.get_job(job.id).status == "cancelled"


def test_the_dashboards_files_are_package_data():
    """An installed wheel serves every template and asset: pyproject's globs cover the folder."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["api.ui"]
    folder = ROOT / "api" / "ui"
    covered = {p for g in globs for p in folder.glob(g)}
    files = {p for p in folder.rglob("*") if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts}
    assert files - covered == set() and Path(folder / "static" / "vendor" / "htmx.min.js") in covered
