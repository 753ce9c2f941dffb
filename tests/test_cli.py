"""The `prefq` command for people and scripts, in-process (Typer's runner) against a real API served by uvicorn
on SQLite and local storage: `--json` prints the API's JSON alone, ids are whole at any width, creates carry an
`Idempotency-Key` that survives a lost answer, and `prefq --help` imports neither Celery nor torch."""

import json
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import uvicorn
from rich.console import Console
from typer.testing import CliRunner

from api.app import create_app
from cli import console as cli_console
from cli.app import app
from cli.stack import free_port, wait_for_port
from tests.conftest import ROOT, python_env
from tests.services import make_key

PAIRS = b'{"prompt": "Q1", "chosen": "A", "rejected": "B"}\n{"prompt": "Q2", "chosen": "A", "rejected": "B"}\n'


@pytest.fixture
def api(settings, tmp_path, monkeypatch, micro_model):
    """A real API on a free port; the CLI's environment points at it with an admin key of tenant `default`."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(port)
    for name, value in {
        "PREFQ_API_URL": f"http://127.0.0.1:{port}",
        "PREFQ_DATA_DIR": str(settings.data_dir),
        "PREFQ_API_KEY": make_key(settings.database_url, "default", admin=True),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }.items():
        monkeypatch.setenv(name, value)
    yield settings
    server.should_exit = True
    thread.join(10)


def prefq(*args: str) -> str:
    """`prefq ARGS` in this process; its stdout (stderr apart), after checking that it succeeded."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"prefq {' '.join(args)}: {result.output}{result.stderr}"
    return result.stdout


def submitted(tmp_path, model) -> str:
    data = tmp_path / "pairs.jsonl"
    data.write_bytes(PAIRS)
    out = prefq("submit", str(data), "--model", str(model), "--method", "dpo", "--gpus", "0")
    return next(line for line in out.splitlines() if line.startswith("job_"))


def test_help_imports_neither_celery_nor_torch():
    code = "import cli.app, sys; assert 'celery' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], env=python_env(), cwd=ROOT, check=True)
    prefq_bin = str(Path(sys.executable).parent / "prefq")
    out = subprocess.run([prefq_bin, "--help"], env=python_env(), capture_output=True, text=True, check=True)
    assert "submit" in out.stdout


def test_every_listing_prints_the_apis_json_and_nothing_else(api, tmp_path, micro_model):
    job_id = submitted(tmp_path, micro_model)
    jobs = json.loads(prefq("list", "--json"))
    assert [j["id"] for j in jobs] == [job_id] and jobs[0]["status"] == "queued"
    assert json.loads(prefq("status", job_id, "--json"))["id"] == job_id
    events = json.loads(prefq("events", job_id, "--json"))
    assert [e["type"] for e in events][:1] == ["queued"]
    assert json.loads(prefq("workers", "--json")) == []
    assert json.loads(prefq("models", "list", "--json")) == []
    assert json.loads(prefq("samples", job_id, "--json")) == []
    doctor = CliRunner().invoke(app, ["doctor", "--json"])  # exit 1: no reconciler has run here
    assert json.loads(doctor.stdout)["checks"]["database"] == "ok", doctor.output


def test_keys_list_json_gives_an_id_that_keys_revoke_takes(api):
    ids = [k["id"] for k in json.loads(prefq("keys", "list", "--json"))]
    assert ids and all(isinstance(i, str) for i in ids)
    prefq("keys", "revoke", ids[0])
    revoked = {k["id"]: k["revoked_at"] for k in json.loads(prefq("keys", "list", "--json"))}
    assert revoked[ids[0]] is not None


def test_ids_are_whole_in_a_narrow_terminal(api, tmp_path, micro_model, monkeypatch):
    """What `COLUMNS=60 prefq list` prints on a terminal: each id whole, on one line."""
    job_id = submitted(tmp_path, micro_model)
    monkeypatch.setattr(cli_console, "console", Console(width=60, force_terminal=False))
    assert any(job_id in line for line in prefq("list").splitlines())
    key_ids = [k["id"] for k in json.loads(prefq("keys", "list", "--json"))]
    lines = prefq("keys", "list").splitlines()
    assert all(any(i in line for line in lines) for i in key_ids)


def test_a_submit_whose_answer_is_lost_is_sent_again_and_makes_one_job(api, tmp_path, micro_model, monkeypatch):
    """The API commits the job, the connection breaks before the answer: the CLI sends it again with the same
    `Idempotency-Key`, and gets the first job back instead of a second one."""
    sent: list[str] = []
    real = httpx.HTTPTransport.handle_request

    def lose_the_first_answer(self, request):
        response = real(self, request)
        if request.method == "POST" and request.url.path == "/jobs":
            sent.append(request.headers.get("idempotency-key"))
            if len(sent) == 1:
                response.close()
                raise httpx.ReadError("connection reset", request=request)
        return response

    with monkeypatch.context() as patched:
        patched.setattr(httpx.HTTPTransport, "handle_request", lose_the_first_answer)
        job_id = submitted(tmp_path, micro_model)
    assert len(sent) == 2 and sent[0] and sent[0] == sent[1]
    assert [j["id"] for j in json.loads(prefq("list", "--json"))] == [job_id]


def test_the_dev_stack_keeps_the_users_model_roots_and_gives_serve_a_token(tmp_path, monkeypatch):
    """`prefq dev`'s environment: the user's PREFQ_MODEL_ROOTS, its data folder and the folder it was started in;
    a serve token made on first start and kept (0600) under the data folder, like the callback secret."""
    from cli.stack import dev_env

    data, shared, project = tmp_path / "data", tmp_path / "shared", tmp_path / "project"
    project.mkdir()
    monkeypatch.setenv("PREFQ_MODEL_ROOTS", f"{shared},/srv/models")
    monkeypatch.chdir(project)
    env = dev_env(data, 1, 2, 0, 3)
    assert env["PREFQ_MODEL_ROOTS"].split(",") == [str(shared), "/srv/models", str(data), str(project)]
    token = env["PREFQ_SERVE_TOKEN"]
    assert len(token) >= 32 and (data / "serve-token").stat().st_mode & 0o777 == 0o600
    assert dev_env(data, 1, 2, 0, 3)["PREFQ_SERVE_TOKEN"] == token


def test_prefq_dev_takes_models_under_the_users_roots_and_its_folder_and_is_ready_when_it_says(tmp_path, micro_model):
    """`PREFQ_MODEL_ROOTS=/some/dir prefq dev`, started in a project folder: right after it says it is up, a job on
    a model under /some/dir and one on a model under the project folder are accepted, with no "no live worker"
    warning (the stack waited for its worker to register)."""
    import os
    import shutil
    import signal

    from cli.stack import free_port

    shared, project = tmp_path / "shared", tmp_path / "project"
    shutil.copytree(micro_model, shared / "base")
    shutil.copytree(micro_model, project / "my-model")
    (project / "pairs.jsonl").write_bytes(PAIRS)
    env = {k: v for k, v in python_env().items() if not k.startswith("PREFQ_")}
    env.update(PREFQ_MODEL_ROOTS=str(shared), XDG_CONFIG_HOME=str(tmp_path / "config"))
    prefq_bin = str(Path(sys.executable).parent / "prefq")
    dev = subprocess.Popen(
        [
            prefq_bin,
            "dev",
            "--port",
            str(free_port()),
            "--flower-port",
            "0",
            "--data-dir",
            str(tmp_path / "dev"),
            "--cpu-devices",
            "1",
        ],
        cwd=project,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        for line in dev.stdout:
            if line.startswith("prefq dev: API"):
                break
        else:
            pytest.fail(f"prefq dev exited ({dev.wait()}); logs in {tmp_path / 'dev' / 'logs'}")
        ids = []
        for model in (shared / "base", "./my-model"):
            out = subprocess.run(
                [prefq_bin, "submit", "pairs.jsonl", "--model", str(model), "--method", "dpo"],
                cwd=project,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 0, out.stdout + out.stderr
            assert "warning:" not in out.stdout + out.stderr, out.stdout
            ids.append(next(line for line in out.stdout.splitlines() if line.startswith("job_")))
        for job_id in ids:
            subprocess.run([prefq_bin, "cancel", job_id], env=env, capture_output=True, timeout=60, check=True)
    finally:
        os.killpg(dev.pid, signal.SIGTERM)
        dev.wait(120)
        dev.stdout.close()


def test_a_refused_model_folder_names_the_setting_and_to_an_admin_the_roots_in_force(api, tmp_path, monkeypatch):
    import tempfile

    data = tmp_path / "pairs.jsonl"
    data.write_bytes(PAIRS)
    outside = Path(tempfile.mkdtemp(prefix="not-a-model-root-"))  # tmp_path is under the roots of `settings`
    submit = ["submit", str(data), "--model", str(outside), "--method", "dpo", "--gpus", "0"]
    admin = CliRunner().invoke(app, submit)
    assert admin.exit_code == 1 and "reference_not_allowed" in admin.stderr, admin.output
    assert "PREFQ_MODEL_ROOTS" in admin.stderr and api.model_roots[0] in admin.stderr, admin.stderr
    monkeypatch.setenv("PREFQ_API_KEY", make_key(api.database_url, "acme"))
    tenant = CliRunner().invoke(app, submit)
    assert tenant.exit_code == 1 and "PREFQ_MODEL_ROOTS" in tenant.stderr, tenant.output
    assert api.model_roots[0] not in tenant.stderr, "only an admin is told the server's folders"
