"""The playground on real processes: the `openai` SDK asks the session stack's API (PostgreSQL, Valkey, SeaweedFS,
a Celery worker) for chat and text completions by a DPO job's model, which `prefq serve` runs in a child process of
its own; limits, tenants, the time limit, a serve that is down, and `prefq chat`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpcore  # noqa: F401 - imports h2 before any test thread can race it (as in test_openai)
import httpx
import openai
import psutil
import pytest
from openai import OpenAI

from tests.services import DPO_JOB_HYPER, SERVE_MAX_TOKENS, SERVE_TIMEOUT_S, make_key, prefq

CAP, LIMIT_S = SERVE_MAX_TOKENS, SERVE_TIMEOUT_S  # the session stack's PREFQ_SERVE_MAX_TOKENS, PREFQ_SERVE_TIMEOUT_S


@pytest.fixture(scope="module")
def served(stack, dpo_job):
    """The session stack (with `prefq serve`), the shared DPO job's fine-tuned model (default tenant), and SDK
    clients for the default tenant and another one."""
    other = OpenAI(
        base_url=f"{stack.url}/v1", api_key=make_key(stack.env["PREFQ_DATABASE_URL"], "serve-other"), max_retries=0
    )
    return stack, dpo_job.client, other, dpo_job.sdk, stack.serve_port


def test_the_sdk_gets_chat_completions_streamed_or_not(served):
    stack, client, _, job, _ = served
    messages = [{"role": "developer", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 3?"}]
    done = client.chat.completions.create(model=job.fine_tuned_model, messages=messages, max_tokens=12, seed=1)
    assert done.object == "chat.completion" and done.model == job.fine_tuned_model and done.id.startswith("chatcmpl-")
    assert done.choices[0].message.role == "assistant" and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.prompt_tokens > 5 and 0 < done.usage.completion_tokens <= 12
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens

    again = client.chat.completions.create(model=job.fine_tuned_model, messages=messages, max_tokens=12, seed=1)
    assert again.choices[0].message.content == done.choices[0].message.content, "a seed makes sampling repeatable"
    greedy = client.chat.completions.create(
        model=job.id, messages=messages, max_completion_tokens=8, temperature=0, stop="\n\n\n"
    )
    assert greedy.usage.completion_tokens <= 8, "a job id names its model too"

    chunks = list(
        client.chat.completions.create(
            model=job.fine_tuned_model,
            messages=messages,
            max_tokens=24,
            temperature=1,
            seed=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip(), chunks
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1, "the text came in pieces"


def test_text_completions_and_a_checkpoint(served):
    _, client, _, job, _ = served
    done = client.completions.create(model=job.fine_tuned_model, prompt="What is 4 + 1?", max_tokens=10, seed=3)
    assert done.object == "text_completion" and done.choices[0].text and done.usage.completion_tokens <= 10
    text = done.choices[0].text
    assert len(text) >= 2, text
    stop = text[len(text) // 2]
    stopped = client.completions.create(
        model=job.fine_tuned_model, prompt="What is 4 + 1?", max_tokens=10, seed=3, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == text[: text.find(stop)]
    pieces = list(client.completions.create(model=job.fine_tuned_model, prompt="Hello", max_tokens=8, stream=True))
    assert "".join(p.choices[0].text for p in pieces) and pieces[-1].choices[0].finish_reason

    checkpoint = client.fine_tuning.jobs.checkpoints.list(job.id).data[-1].fine_tuned_model_checkpoint
    assert checkpoint.endswith(f":ckpt-step-{DPO_JOB_HYPER['save_steps']}")
    assert client.completions.create(model=checkpoint, prompt="Hello", max_tokens=4).usage.completion_tokens > 0


def test_invalid_requests_are_400s_naming_the_param(served):
    _, client, _, job, _ = served
    model, hi = job.fine_tuned_model, [{"role": "user", "content": "hi"}]
    for kwargs, param in [
        ({"max_tokens": CAP + 1}, "max_tokens"),
        ({"max_completion_tokens": CAP + 1}, "max_completion_tokens"),
        ({"n": 2}, "n"),
        ({"temperature": 3}, "temperature"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({"messages": []}, "messages"),
        ({"logit_bias": {"x": 1}}, "logit_bias.x.[key]"),
        ({"stop": ["a"] * 5}, "stop"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(**{"model": model, "messages": hi, **kwargs})
        assert err.value.status_code == 400 and err.value.param == param, (kwargs, err.value.body)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="x " * 100, max_tokens=CAP)
    assert err.value.code == "context_length_exceeded" and err.value.param == "prompt"


def test_other_tenants_and_unknown_models_are_not_found(served):
    _, client, other, job, _ = served
    hi = [{"role": "user", "content": "hi"}]
    for who, model in [
        (other, job.fine_tuned_model),
        (other, job.id),
        (client, "job_doesnotexist"),
        (client, job.fine_tuned_model.replace(":default:", ":alpha:")),
        (client, "gpt-4o-mini"),
        (client, f"{job.fine_tuned_model}:ckpt-step-3"),
        (client, "s3://prefq/anything"),
    ]:
        with pytest.raises(openai.NotFoundError) as err:
            who.chat.completions.create(model=model, messages=hi, max_tokens=4)
        assert err.value.code == "model_not_found" and model in err.value.message, err.value.body


def _no_eos(micro_model: Path) -> dict:
    """A logit bias that keeps every special token (eos, end of turn) out: the generation runs to max_tokens."""
    from transformers import AutoTokenizer

    from training.tiny import SPECIAL_TOKENS

    tokenizer = AutoTokenizer.from_pretrained(micro_model)
    return {str(tokenizer.convert_tokens_to_ids(t)): -100 for t in SPECIAL_TOKENS}


def test_a_generation_past_the_time_limit_is_an_error_and_the_next_one_is_answered(served, micro_model):
    _, client, _, job, _ = served
    long = {"model": job.fine_tuned_model, "prompt": "Hi", "max_tokens": CAP - 10, "logit_bias": _no_eos(micro_model)}
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(**long)
    assert err.value.status_code == 504 and err.value.code == "timeout" and "PREFQ_SERVE_TIMEOUT_S" in err.value.message
    assert time.monotonic() - started < LIMIT_S + 3
    assert client.completions.create(model=job.fine_tuned_model, prompt="Hi", max_tokens=4).usage.completion_tokens

    stream = client.chat.completions.create(
        model=job.fine_tuned_model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=CAP - 40,
        logit_bias=_no_eos(micro_model),
        stream=True,
    )
    text = []
    with pytest.raises(openai.APIError, match="time limit"):
        for chunk in stream:
            text.append(chunk.choices[0].delta.content or "")
    assert "".join(text), "the text before the limit was streamed"
    answer = client.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert answer.usage.completion_tokens > 0


def test_a_reader_that_leaves_mid_stream_costs_no_reload(served, micro_model):
    stack, client, _, job, _ = served

    def pid() -> set[int]:
        return _model_pids(stack)

    hi = [{"role": "user", "content": "Hi"}]
    client.chat.completions.create(model=job.fine_tuned_model, messages=hi, max_tokens=2)
    before = pid()
    stream = client.chat.completions.create(
        model=job.fine_tuned_model, messages=hi, max_tokens=60, logit_bias=_no_eos(micro_model), stream=True
    )
    next(iter(stream))
    stream.close()
    assert client.chat.completions.create(model=job.fine_tuned_model, messages=hi, max_tokens=4).choices
    assert pid() == before, "the rest of the abandoned answer was read, not killed"


def test_prefq_chat_prints_a_reply(served):
    stack, _, _, job, _ = served
    out = prefq(
        stack,
        "chat",
        job.fine_tuned_model,
        "--message",
        "What is 2 + 3?",
        "--max-tokens",
        "16",
        "--temperature",
        "1",
        "--seed",
        "4",
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.strip(), out.stdout + out.stderr
    out = prefq(stack, "chat", "job_doesnotexist", "--message", "hi", timeout=120)
    assert out.returncode == 1 and "model_not_found" in out.stderr, out.stdout + out.stderr
    repl = subprocess.run(
        ["prefq", "chat", job.fine_tuned_model, "--max-tokens", "8"],
        input="hi\n/reset\nhello\n",
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert repl.returncode == 0 and repl.stdout.count("> ") == 4, repl.stdout + repl.stderr


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _model_pids(stack) -> set[int]:
    """The model processes of `prefq serve`: its children (its `/healthz` gives only their count)."""
    return {child.pid for child in psutil.Process(stack.procs["serve"].pid).children()}


def test_neither_the_api_nor_the_serve_process_imports_torch(served):
    stack, _, _, _, port = served
    from tests.conftest import python_env

    subprocess.run(
        [sys.executable, "-c", "import api.app, sys; assert 'torch' not in sys.modules"], check=True, env=python_env()
    )
    assert httpx.post(f"http://127.0.0.1:{port}/generate", json={}).status_code == 401, "the token is required"
    health = httpx.get(f"http://127.0.0.1:{port}/healthz").json()
    assert health["torch_imported"] is False and health["models_loaded"], health
    assert health["models_loaded"] <= 2, "PREFQ_SERVE_MAX_MODELS"
    serve = stack.procs["serve"].pid  # `prefq serve` execs uvicorn in the same process
    assert "libtorch" not in _maps(serve) and "libtorch" not in _maps(stack.procs["api"].pid)
    assert all("libtorch" in _maps(pid) for pid in _model_pids(stack)), "the children run the models"


def test_a_serve_that_is_down_is_a_503_until_it_is_back(served):
    stack, client, _, job, port = served
    proc = stack.procs["serve"]
    children = _model_pids(stack)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model=job.fine_tuned_model, messages=hi, max_tokens=4)
    assert err.value.status_code == 503 and err.value.code == "serve_unavailable"
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_running(pid) for pid in children), "the model processes died with the serve"
    from cli.stack import wait_for_port

    stack.start_serve()
    wait_for_port(port, 60)
    assert client.chat.completions.create(model=job.fine_tuned_model, messages=hi, max_tokens=4).choices


def test_a_models_start_does_not_count_as_waiting_for_a_busy_model(served, micro_model):
    """The first request for a model waits for its process to start (import torch, load the weights); a serve whose
    time limit is shorter than that start still answers it, instead of a 503 saying the model answered other
    requests (there were none). A model holds `PREFQ_SERVE_MAX_WAITING` requests: one more is a 503 at once."""
    from concurrent.futures import ThreadPoolExecutor

    from cli.stack import free_port, stop, wait_for_port

    stack, _, _, job, _ = served
    port = free_port()
    env = {"PREFQ_SERVE_TIMEOUT_S": "0.5", "PREFQ_SERVE_MAX_WAITING": "1"}
    quick = stack.start("serve-quick", "serve", "--port", str(port), env=env)
    body = {"model_uri": stack.get(f"/jobs/{job.id}")["result_uri"], "prompt": "Hi"}

    def ask(rid: str, **more) -> list[dict]:
        answer = httpx.post(
            f"http://127.0.0.1:{port}/generate",
            json={"id": rid, **body, "max_tokens": 1, **more},
            timeout=120,
            headers={"Authorization": f"Bearer {stack.env['PREFQ_SERVE_TOKEN']}"},
        )
        assert answer.status_code == 200, answer.text
        return [json.loads(line) for line in answer.text.splitlines()]

    try:
        wait_for_port(port, 60)
        lines = ask("first")
        long = {"max_tokens": CAP - 10, "logit_bias": _no_eos(micro_model)}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(ask, "long", **long)
            time.sleep(0.1)
            second = ask("second", **long)
            first = first.result()
    finally:
        stop([quick])
    assert lines[-1].get("done") and not any("error" in line for line in lines), lines
    assert first[-1]["error"]["code"] == "timeout", first[-1]
    assert second == [second[0]] and second[0]["error"]["code"] == "serve_busy", second
    assert "PREFQ_SERVE_MAX_WAITING" in second[0]["error"]["message"]


def test_a_registered_model_answers_by_its_name_and_in_the_dashboards_chat_box(served, browser):
    """Promoted to the registry, the job's model answers the SDK as models:/NAME@ALIAS and as the bare NAME, and in
    the chat box of its page on the dashboard; another tenant's SDK finds no such model."""
    from tests.test_ui import Watched, shot, sign_in

    stack, client, other, job, _ = served
    promoted = stack.http.post("/models/served-dpo/versions", json={"job_id": job.id, "aliases": ["production"]})
    assert promoted.status_code == 201, promoted.text
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    by_alias = client.chat.completions.create(
        model="models:/served-dpo@production", messages=messages, max_tokens=8, temperature=0
    )
    direct = client.chat.completions.create(model=job.fine_tuned_model, messages=messages, max_tokens=8, temperature=0)
    assert by_alias.model == "models:/served-dpo@production"
    assert by_alias.choices[0].message.content == direct.choices[0].message.content, "the same model answers"
    assert client.chat.completions.create(model="served-dpo", messages=messages, max_tokens=4).usage.completion_tokens
    for name in ("models:/served-dpo@production", "served-dpo"):
        with pytest.raises(openai.NotFoundError):
            other.chat.completions.create(model=name, messages=messages, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="models:/served-dpo@staging", messages=messages, max_tokens=4)

    ui = Watched(browser, stack.url, viewport={"width": 1280, "height": 900})
    page = ui.page()
    sign_in(page, stack.env["PREFQ_API_KEY"], "/ui/models/served-dpo")
    page.select_option("#chat-version", "production")
    page.fill("#chat-message", "What is 2 + 3?")
    page.click("#chat-send")
    page.wait_for_selector("#chat-log .chat-reply, #chat-log .chat-error", timeout=60_000)
    assert page.locator("#chat-log .chat-error").count() == 0, page.inner_text("#chat-log")
    assert "models:/served-dpo@production" in page.inner_text("#chat-log .chat-reply")
    reply = page.inner_text("#chat-log .chat-reply .reply-text")  # as shown: without leading or trailing blanks
    assert (
        reply
        == client.chat.completions.create(
            model="models:/served-dpo@production", messages=messages, max_tokens=64, temperature=0
        )
        .choices[0]
        .message.content.strip()
    )
    shot(page, "15-model-chat")
    assert ui.errors == [], ui.errors
    ui.context.close()


def test_serve_healthz_tells_no_model_tenant_or_job(settings):
    """`/healthz` answers anyone who reaches the port (a probe has no token): a count of the loaded models, never
    their storage URIs, which name tenants and jobs."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from serve.app import create_app

    app = create_app(settings)
    uri = "s3://b/tenants/acme/jobs/job_01abc/model/"
    app.state.pool.children[uri] = SimpleNamespace(
        uri=uri, proc=SimpleNamespace(pid=4242), lock=SimpleNamespace(locked=lambda: False)
    )
    health = TestClient(app).get("/healthz")
    assert health.status_code == 200 and health.json()["models_loaded"] == 1, health.text
    assert "acme" not in health.text and "job_01abc" not in health.text and "4242" not in health.text


@pytest.fixture(scope="module")
def lora_jobs(stack, toy_dpo):
    """Two LoRA DPO jobs of the hub model (the default tenant), at different seeds and learning rates, each with a
    checkpoint at step 4; as the SDK reads them."""
    from tests.services import HUB_ID, submit

    ids = [
        submit(
            stack,
            HUB_ID,
            toy_dpo,
            *("--set", "lora.r=8", "--set", "max_steps=8", "--set", "save_steps=4"),
            *("--set", f"learning_rate={rate}", "--set", f"seed={seed}"),
        )
        for rate, seed in [(3e-3, 1), (2e-2, 2)]
    ]
    jobs = [stack.wait_for(job_id, {"succeeded", "failed", "cancelled"}, timeout_s=300) for job_id in ids]
    assert all(job["status"] == "succeeded" for job in jobs), jobs
    client = OpenAI(base_url=f"{stack.url}/v1", api_key=stack.env["PREFQ_API_KEY"], max_retries=0)
    return [client.fine_tuning.jobs.retrieve(job_id) for job_id in ids]


QUESTIONS = ["What is 2 plus 4?", "What is 3 plus 3?", "Hi", "What is 1 plus 1?"]


def _greedy(client, model: str) -> list[str]:
    return [
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": q}], max_tokens=12, temperature=0
        )
        .choices[0]
        .message.content
        for q in QUESTIONS
    ]


def test_lora_models_and_checkpoints_are_adapters_served_on_one_base(served, lora_jobs):
    """Two LoRA jobs' models and a checkpoint of one answer through the SDK from one process of their base (the hub
    model), each with its own adapter; the adapter on the base answers as the job's merged model does (greedy,
    fp32)."""
    stack, client, _, _, port = served
    before = _model_pids(stack)
    first, second = (_greedy(client, job.fine_tuned_model) for job in lora_jobs)
    checkpoint = _greedy(client, f"{lora_jobs[0].fine_tuned_model}:ckpt-step-4")
    assert first != second, "two adapters, two models"
    assert checkpoint and all(isinstance(t, str) for t in checkpoint)
    started = _model_pids(stack) - before
    assert len(started) == 1, f"one process of the base serves both jobs and the checkpoint: {started}"

    merged = stack.get(f"/jobs/{lora_jobs[0].id}")["result_uri"]  # the final folder: the merged model
    headers = {"Authorization": f"Bearer {stack.env['PREFQ_SERVE_TOKEN']}"}
    for question, text in zip(QUESTIONS, first, strict=True):
        body = {"id": f"m-{question}", "model_uri": merged, "max_tokens": 12, "temperature": 0}
        body["messages"] = [{"role": "user", "content": question}]
        lines = httpx.post(f"http://127.0.0.1:{port}/generate", json=body, headers=headers, timeout=120).text
        deltas = [json.loads(line) for line in lines.splitlines()]
        assert "".join(d.get("delta", "") for d in deltas) == text, (question, deltas)


def _vm(pid: int, field: str) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


class Generating:
    """A model process (`python -m training generate`) driven through its pipes."""

    def __init__(self, model: Path, *args: str, stderr=None):
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "training", "generate", str(model), "--batch", "8", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert json.loads(self.proc.stdout.readline())["ready"]
        self.other: dict[str, list[dict]] = {}

    def send(self, *requests) -> None:
        for req in requests:
            self.proc.stdin.write(json.dumps({"max_tokens": 8, "temperature": 0, **req}) + "\n")
        self.proc.stdin.flush()

    def ask(self, *requests) -> dict[str, dict]:
        """Send `requests` at once; each one's text and `done` line, by id (lines of others go to `other`)."""
        self.send(*requests)
        answers = {r["id"]: {"text": ""} for r in requests}
        while not all("done" in a for a in answers.values()):
            line = json.loads(self.proc.stdout.readline())
            assert "error" not in line, line
            if line["id"] not in answers:
                self.other.setdefault(line["id"], []).append(line)
                continue
            answers[line["id"]]["text"] += line.get("delta", "")
            if line.get("done"):
                answers[line["id"]]["done"] = line
        return answers

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def test_adapters_share_one_copy_of_their_base(small_model, tmp_path):
    """A model process answering with LoRA adapters of its 23M-parameter base holds one copy of the base: a second
    adapter grows its peak memory by a small part of the base's weights (a copy would grow it by all of them)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    weights = sum(p.stat().st_size for p in small_model.glob("*.safetensors"))
    for i in range(2):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(small_model)
        lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(tmp_path / f"adapter{i}")
    adapter = [{"name": f"a{i}", "folder": str(tmp_path / f"adapter{i}")} for i in range(2)]
    gen = Generating(small_model)
    try:
        gen.ask({"id": "base", "prompt": "Hello"}, {"id": "first", "prompt": "Hello", "adapter": adapter[0]})
        one = _vm(gen.proc.pid, "VmHWM")
        answers = gen.ask(*({"id": f"r{i}", "prompt": "Hello", "adapter": adapter[i]} for i in range(2)))
        assert all(a["done"]["completion_tokens"] == 8 for a in answers.values()), answers
        grown = _vm(gen.proc.pid, "VmHWM") - one
        assert grown < 0.25 * weights, (
            f"a second adapter grew the peak by {grown / 1e6:.0f} MB; the base is {weights / 1e6:.0f} MB"
        )
        assert "bitsandbytes" not in Path(f"/proc/{gen.proc.pid}/maps").read_text()
    finally:
        gen.close()


def test_adapters_beyond_the_budget_are_unloaded_least_recently_used_first_and_loaded_again(micro_model, tmp_path):
    """With room for one adapter (`--adapter-mb`), asking for a second unloads the first; asked again, the first is
    loaded again and answers as it did."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for i in range(2):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(micro_model)
        lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(tmp_path / f"adapter{i}")
    size = sum(p.stat().st_size for p in (tmp_path / "adapter0").glob("*.safetensors"))
    log = tmp_path / "generate.log"
    with open(log, "w") as err:
        gen = Generating(micro_model, "--adapter-mb", str(1.5 * size / 1e6), stderr=err)
    no_eos = _no_eos(micro_model)
    try:
        texts = []
        for i in (0, 1, 0):
            adapter = {"name": f"a{i}", "folder": str(tmp_path / f"adapter{i}")}
            answer = gen.ask({"id": f"r{len(texts)}", "prompt": "Hello", "adapter": adapter, "logit_bias": no_eos})
            texts.append(answer[f"r{len(texts)}"]["text"])
    finally:
        gen.close()
    assert texts[0] == texts[2] != texts[1], texts
    lines = log.read_text()
    assert lines.count("unloaded") == 2 and lines.count("loading") == 3, lines


def test_a_batch_answers_as_its_requests_one_by_one(micro_model):
    """Eight greedy requests answered together (one batch, left-padded) give the texts they give one by one."""
    gen = Generating(micro_model)
    try:
        no_eos = _no_eos(micro_model)  # every answer runs to max_tokens: the batch ends its rows at different steps
        asked = [
            {"id": f"s{i}", "prompt": "What is " * i + "2?", "max_tokens": 4 + i, "logit_bias": no_eos}
            for i in range(8)
        ]
        one_by_one = {r["id"]: gen.ask(r)[r["id"]]["text"] for r in asked}
        together = {rid: a["text"] for rid, a in gen.ask(*asked).items()}
        assert together == one_by_one and all(one_by_one.values()), (together, one_by_one)

        # requests that arrive while a batch is under way join it (their caches padded into the batch's)
        long = {"id": "long", "prompt": "Hello there", "max_tokens": 300, "logit_bias": no_eos}
        alone = gen.ask(long)["long"]["text"]
        gen.send(long)
        lines = [json.loads(gen.proc.stdout.readline())]
        assert lines[0]["id"] == "long" and "delta" in lines[0], lines
        joined = gen.ask(*asked[:3])
        assert {rid: a["text"] for rid, a in joined.items()} == {r["id"]: one_by_one[r["id"]] for r in asked[:3]}
        lines += gen.other.pop("long", [])
        assert not any(line.get("done") for line in lines), "the late requests ended while the long one went on"
        while not lines[-1].get("done"):
            lines.append(json.loads(gen.proc.stdout.readline()))
        assert "".join(line.get("delta", "") for line in lines) == alone
    finally:
        gen.close()


def test_prefq_export_gives_folders_that_load_and_generate_with_a_model_card(served, lora_jobs, micro_model, tmp_path):
    """A LoRA job exported merged (from_pretrained) and as its adapter (PEFT, on the base named by the hub id) give
    the same greedy tokens; a LoRA checkpoint exported merged is merged by the CLI and loads; the model card names
    the job; formats that do not exist for a job are 422s naming `format`; another tenant's job is a 404."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.services import HUB_ID

    stack, _, other, dpo, _ = served
    job = lora_jobs[0]
    for name, args in [
        ("merged", []),
        ("adapter", ["--format", "adapter"]),
        ("ckpt", ["--checkpoint", "4"]),
    ]:
        out = prefq(stack, "export", job.id, str(tmp_path / name), *args)
        assert out.returncode == 0, out.stdout + out.stderr
    card = (tmp_path / "merged" / "README.md").read_text()
    assert job.id in card and "dpo" in card and "lora" in card and "eval_loss" in card, card
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == HUB_ID, "the base as the job named it"
    assert not (tmp_path / "merged" / "adapter").exists() and not list((tmp_path / "merged").glob("optimizer*"))

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    prompt = tokenizer("What is 2 plus 4?", return_tensors="pt")

    def greedy(model) -> list[int]:
        with torch.inference_mode():
            return model.generate(**prompt, max_new_tokens=12, do_sample=False)[0].tolist()

    merged = greedy(AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32))
    on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(micro_model), tmp_path / "adapter")
    assert greedy(on_base) == merged
    assert len(greedy(AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt"))) > prompt["input_ids"].shape[1]
    assert "checkpoint at step 4" in (tmp_path / "ckpt" / "README.md").read_text()

    for job_id, params in [(dpo.id, {"format": "adapter"}), (job.id, {"format": "hf", "checkpoint": 4})]:
        refused = stack.http.get(f"/jobs/{job_id}/export", params=params)
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "format", refused.text
    assert stack.http.get(f"/jobs/{job.id}/export", params={"format": "gguf"}).status_code == 422
    theirs = httpx.get(f"{stack.url}/jobs/{job.id}/export", headers={"Authorization": f"Bearer {other.api_key}"})
    assert theirs.status_code == 404, theirs.text


def test_the_vllm_engine_says_what_it_needs_where_it_cannot_run(micro_model):
    """`--engine vllm` on a machine without vLLM or CUDA: one `model_unavailable` line that says which, exit 2 (the
    serve relays it as the request's error); `prefq serve` refuses an engine it does not know, by name."""
    done = subprocess.run(
        [sys.executable, "-P", "-m", "training", "generate", str(micro_model), "--engine", "vllm"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    line = json.loads(done.stdout.splitlines()[0])
    assert done.returncode == 2 and line["error"]["code"] == "model_unavailable", (done.stdout, done.stderr[-2000:])
    assert "CUDA" in line["error"]["message"] or "vllm" in line["error"]["message"], line
    prefq_command = str(Path(sys.executable).with_name("prefq"))
    refused = subprocess.run([prefq_command, "serve", "--engine", "tgi"], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "--engine" in refused.stdout + refused.stderr, refused
