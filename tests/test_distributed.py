"""The fsdp and deepspeed-tp trainers as 2 CPU processes over gloo: sharding, numbers, queue, resume, cancel."""

import json

import httpx
import psutil
import pytest

from tests.conftest import dpo_spec, of_type, run_cold, run_training
from tests.services import wait
from tests.test_service import alive, prefq, submit
from training.spec import EXIT_OK

TRAINERS = [("fsdp", 4), ("deepspeed-tp", 8)]  # (trainer, per-process batch giving the global batch of 8)


@pytest.fixture(scope="module")
def ray_nodes(ray_cluster):
    """The stack's Ray cluster with two nodes, for this module's tests; stopped after them."""
    ray_cluster.start(2)
    yield ray_cluster
    ray_cluster.stop()


@pytest.fixture(scope="module")
def basic_run(tmp_path_factory, micro_model, toy_dpo):
    out = tmp_path_factory.mktemp("basic") / "run"
    rc, events = run_training(
        dpo_spec(micro_model, toy_dpo, max_steps=4, batch_size=8, eval_fraction=0, precision="fp32"), out
    )
    assert rc == EXIT_OK
    return out, events


@pytest.mark.parametrize("reference", ["per-step", "precomputed"])
@pytest.mark.parametrize(("trainer", "batch_size"), TRAINERS)
def test_distributed_trainer_matches_basic(trainer, batch_size, reference, basic_run, micro_model, toy_dpo, tmp_path):
    """fsdp: each of 2 processes takes half of the batch of 8; deepspeed-tp: both see all 8. Same seed, same
    examples, fp32: the step-0 log-probs agree within 1e-4 and the first 4 losses within 1e-5, with a reference
    forward per step or with the reference log-probs precomputed (and cached) before training, against basic with
    a reference forward per step."""
    spec = dpo_spec(
        micro_model,
        toy_dpo,
        max_steps=4,
        batch_size=batch_size,
        eval_fraction=0,
        precision="fp32",
        trainer=trainer,
        gpus=2,
    )
    if reference == "precomputed":
        spec.update(precompute_ref_log_probs=True, ref_cache_dir=str(tmp_path / "cache"))
    rc, events = run_training(spec, tmp_path / "run")
    assert rc == EXIT_OK, events
    passes = [(e["split"], e["cached"], e["forward_passes"], e["rows"]) for e in of_type(events, "ref_logprobs")]
    # fsdp: each rank scores half of the 400 pairs in batches of 4; deepspeed-tp: every rank all of them, by 8
    assert passes == ([("train", False, 50, 400)] if reference == "precomputed" else [])
    basic_out, basic_events = basic_run
    ours, theirs = of_type(events, "progress"), of_type(basic_events, "progress")
    for key in ("logps/chosen", "logps/rejected"):
        assert ours[0]["metrics"][key] == pytest.approx(theirs[0]["metrics"][key], abs=1e-4), key
    assert [e["loss"] for e in ours] == pytest.approx([e["loss"] for e in theirs], abs=1e-5)
    assert ours[0]["metrics"]["num_tokens"] == theirs[0]["metrics"]["num_tokens"], "each token counted once"

    from safetensors.torch import load_file

    final, reference = (
        load_file(tmp_path / "run" / "final" / "model.safetensors"),
        load_file(basic_out / "final" / "model.safetensors"),
    )
    assert set(final) == set(reference)
    assert max((final[k] - reference[k]).abs().max().item() for k in final) < 1e-4


@pytest.mark.parametrize("start", ["forked", "cold"])
def test_fsdp_parameters_are_sharded_dtensors(micro_model, toy_dpo, tmp_path, start):
    """As ranks forked from a warm run (`training.ranks`) and as ranks of `accelerate launch` (a run started cold,
    with nothing imported when it launches), the same FSDP2 sharding."""
    spec = dpo_spec(micro_model, toy_dpo, max_steps=1, eval_fraction=0, trainer="fsdp", gpus=2)
    rc, events = (run_training if start == "forked" else run_cold)(spec, tmp_path / "run")
    assert rc == EXIT_OK
    p = of_type(events, "started")[0]["parallelism"]
    assert p["processes"] == 2 and p["parameters"] > 0 and p["dtensor_parameters"] == p["parameters"]
    assert p["lm_head"]["class"] == "FSDPLinear", "FSDP2 units, not DDP replicas"


def test_deepspeed_tp_splits_attention_and_mlp_but_not_the_lm_head(micro_model, toy_dpo, tmp_path):
    spec = dpo_spec(micro_model, toy_dpo, max_steps=1, eval_fraction=0, trainer="deepspeed-tp", gpus=2)
    rc, events = run_training(spec, tmp_path / "run")
    assert rc == EXIT_OK
    p = of_type(events, "started")[0]["parallelism"]
    assert p["layer_classes"] == {
        "self_attn.q_proj": "LinearLayer",
        "self_attn.o_proj": "LinearAllreduce",
        "mlp.up_proj": "LinearLayer",
        "mlp.down_proj": "LinearAllreduce",
    }
    vocab = json.loads((micro_model / "config.json").read_text())["vocab_size"]
    assert p["lm_head"] == {"class": "Linear", "rows": vocab}, "log-softmax over the whole vocabulary"


def test_deepspeed_tp_refuses_heads_that_do_not_divide(micro_model, toy_dpo, tmp_path):
    rc, events = run_training(dpo_spec(micro_model, toy_dpo, trainer="deepspeed-tp", gpus=3), tmp_path / "run")
    assert rc == 2 and events[-1]["code"] == "invalid_spec"
    assert "num_attention_heads (4) over 3 processes" in events[-1]["message"]


def run_processes(job_id: str) -> list[psutil.Process]:
    """Every process of the job's run: whose command line names the job (a cold start's), or whose working folder is
    the job's (a run forked warm, and the ranks it forks, have the warm server's command line)."""
    found = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        if any(job_id in part for part in p.info["cmdline"] or []) or job_id in (p.info["cwd"] or ""):
            found.append(p)
    return found


def rank_processes(job_id: str) -> list[psutil.Process]:
    """The job's rank processes: those that call `training.distributed.in_launched_rank` true (LOCAL_RANK set, in
    the environment they were started with, or, forked, in the one they set: their children of the run)."""
    found = run_processes(job_id)
    started = [p for p in found if "LOCAL_RANK" in _environ(p)]
    return started or [c for p in found for c in _children(p) if p in found and c in found and _forked_rank(c, p)]


def _environ(p: psutil.Process) -> dict:
    try:
        return p.environ()
    except psutil.Error:
        return {}


def _children(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.children()
    except psutil.Error:
        return []


def _forked_rank(child: psutil.Process, parent: psutil.Process) -> bool:
    try:
        return child.cmdline() == parent.cmdline() and child.ppid() == parent.pid
    except psutil.Error:
        return False


@pytest.mark.parametrize(("trainer", "batch_size"), TRAINERS)
def test_through_the_queue_cancel_then_retry_resumes_and_learns(
    stack, micro_model, toy_dpo, trainer, batch_size, tmp_path
):
    job_id = submit(
        stack,
        micro_model,
        toy_dpo,
        "--trainer",
        trainer,
        "--gpus",
        "2",
        "--set",
        "max_steps=24",
        "--set",
        "save_steps=8",
        "--set",
        f"batch_size={batch_size}",
    )
    stack.wait_for_event(job_id, "started")
    workers = prefq(stack, "workers").stdout
    assert job_id in workers and "CPU x2" in workers, workers
    ranks = wait(lambda: (found := rank_processes(job_id)) and len(found) == 2 and found, 30, "two rank processes")
    assert len(ranks) == 2, "two rank processes train"

    stack.wait_for_event(job_id, "checkpoint")  # cancelled at once, long before the end
    assert prefq(stack, "cancel", job_id).returncode == 0
    cancelled = stack.wait_for(job_id, {"cancelled", "failed", "succeeded"})
    assert cancelled["status"] == "cancelled", cancelled
    assert run_processes(job_id) == [] and not any(alive(r.pid) for r in ranks), "no rank process left behind"
    saved = max(c["step"] for c in stack.get(f"/jobs/{job_id}/checkpoints")["data"])

    assert prefq(stack, "retry", job_id).returncode == 0
    done = stack.wait_for(job_id, {"succeeded", "failed"})
    assert done["status"] == "succeeded" and done["step"] == 24, done
    assert done["eval_metrics"]["eval_rewards/accuracies"] >= 0.9
    events = stack.get(f"/jobs/{job_id}/events")["data"]
    started = [e["data"] for e in events if e["type"] == "started"]
    assert started[-1]["resumed_from_step"] == saved and started[-1]["trainer"] == trainer
    assert started[-1]["parallelism"]["processes"] == 2

    # a sharded checkpoint is kept consolidated beside its shards: the playground serves it through the SDK
    from openai import OpenAI

    listed = stack.get(f"/jobs/{job_id}/checkpoints")["data"]
    step = max(c["step"] for c in listed)
    client = OpenAI(base_url=f"{stack.url}/v1", api_key=stack.env["PREFQ_API_KEY"], max_retries=0)
    name = f"{client.fine_tuning.jobs.retrieve(job_id).fine_tuned_model}:ckpt-step-{step}"
    answer = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "What is 2 plus 4?"}], max_tokens=8, temperature=0
    )
    assert answer.model == name and answer.usage.completion_tokens > 0, answer
    # and exported as it is consolidated: a folder `from_pretrained` loads, without the shards or trainer state
    from transformers import AutoModelForCausalLM

    out = prefq(stack, "export", job_id, str(tmp_path / "hf"), "--checkpoint", str(step), "--format", "hf")
    assert out.returncode == 0, out.stdout + out.stderr
    assert {p.name for p in (tmp_path / "hf").iterdir()} >= {"config.json", "model.safetensors", "README.md"}
    assert not [p for p in (tmp_path / "hf").iterdir() if p.is_dir() or p.name.startswith(("optimizer", "rng"))]
    AutoModelForCausalLM.from_pretrained(tmp_path / "hf")


def test_a_forked_rank_that_dies_ends_the_run_and_leaves_no_process(micro_model, toy_dpo, tmp_path):
    """A rank killed mid-run (SIGKILL: no goodbye): the run that forked the ranks stops the other one and ends with a
    failure, instead of waiting on a collective that can never finish; no rank is left."""
    import signal
    import time

    from tests.conftest import start_training

    spec = dpo_spec(micro_model, toy_dpo, max_steps=5000, eval_fraction=0, trainer="fsdp", gpus=2)
    proc = start_training(spec, tmp_path / "run")
    for line in proc.stdout:
        if json.loads(line)["event"] == "progress":
            break
    run = psutil.Process(proc.pid)
    ranks = run.children()
    assert len(ranks) == 2 and all(r.cmdline() == run.cmdline() for r in ranks), "two ranks forked from the run"
    started = time.monotonic()
    ranks[1].send_signal(signal.SIGKILL)
    code = proc.wait(timeout=90)
    assert code not in (0, 75), code
    assert time.monotonic() - started < 45, "the other rank was stopped, not waited for"
    assert not [r for r in ranks if r.is_running() and r.status() != psutil.STATUS_ZOMBIE], "no rank left"


def _weights(stack, job_id: str, folder) -> dict:
    """The job's final model's tensors, downloaded."""
    from safetensors.torch import load_file

    folder.mkdir(parents=True)
    for f in stack.get(f"/jobs/{job_id}/model")["files"]:
        if f["name"].endswith(".safetensors") and "/" not in f["name"]:
            (folder / f["name"]).write_bytes(httpx.get(f["url"], timeout=60).content)
    return {k: v for p in folder.glob("*.safetensors") for k, v in load_file(p).items()}


@pytest.mark.parametrize("trainer", ["fsdp", pytest.param("deepspeed-tp", marks=pytest.mark.long)])
def test_a_two_node_job_trains_as_one_node_does(trainer, stack, ray_nodes, micro_model, toy_dpo, tmp_path):
    """FSDP (and in the long run DeepSpeed's tensor parallelism) on two Ray nodes of one rank each (the session's two
    raylets), through the queue: the same losses and final weights (within 1e-4) as the same job on one node of two
    ranks; no process of either is left."""
    fixed = ["--trainer", trainer, "--set", "eval_fraction=0", "--set", "precision=fp32", "--set", "save_steps=4"]
    one = submit(stack, micro_model, toy_dpo, *fixed, "--gpus", "2", "--set", "max_steps=8")
    two = submit(stack, micro_model, toy_dpo, *fixed, "--gpus", "1", "--nodes", "2", "--set", "max_steps=8")
    runs = {}
    for job_id in (one, two):
        done = stack.wait_for(job_id, {"succeeded", "failed", "cancelled"})
        assert done["status"] == "succeeded", done
        events = stack.get(f"/jobs/{job_id}/events?limit=1000")["data"]
        runs[job_id] = [e["data"]["loss"] for e in events if e["type"] == "progress"]
    assert stack.get(f"/jobs/{two}")["nodes"] == 2
    assert runs[two] == pytest.approx(runs[one], abs=1e-4) and len(runs[two]) == 8, runs
    mine, theirs = _weights(stack, two, tmp_path / "two"), _weights(stack, one, tmp_path / "one")
    assert mine.keys() == theirs.keys()
    for name, tensor in mine.items():
        assert (tensor - theirs[name]).abs().max().item() < 1e-4, name
    wait(lambda: run_processes(two) == [], 30, "no process of the finished job")


def test_a_two_node_job_waits_queued_for_a_lost_node_resumes_and_is_cancelled_and_retried(
    stack, ray_nodes, micro_model, toy_dpo
):
    """A node of a running two-node job is lost (its raylet SIGKILLed): the job is handed back, and with one node
    left it cannot be placed, so it waits `queued` with the reason (API, CLI, dashboard) and nothing of it runs, not
    even the lost node's rank. A node comes back: the job resumes from its newest checkpoint. Then it is cancelled
    (no process left) and retried as a one-node job is, and cancelled again while its ranks start."""
    fixed = ["--trainer", "fsdp", "--set", "eval_fraction=0", "--set", "precision=fp32", "--set", "save_steps=4"]
    job_id = submit(stack, micro_model, toy_dpo, *fixed, "--gpus", "1", "--nodes", "2", "--set", "max_steps=400")
    stack.wait_for_event(job_id, "checkpoint")
    assert len(rank_processes(job_id)) == 2
    ray_nodes.kill_node()

    def job() -> dict:
        return stack.get(f"/jobs/{job_id}")

    waiting = wait(lambda: (j := job())["status"] == "queued" and j["queued_reason"] and j, 90, "queued for a node")
    assert "waiting for 2 nodes" in waiting["queued_reason"] and "1 alive" in waiting["queued_reason"], waiting
    ui = httpx.Client(base_url=stack.url, timeout=30, follow_redirects=True)
    assert ui.post("/ui/login", data={"key": stack.env["PREFQ_API_KEY"]}).status_code == 200
    page = ui.get(f"/ui/jobs/{job_id}").text
    assert "on each of 2 nodes" in page and "waiting for 2 nodes" in page
    shown = json.loads(prefq(stack, "status", job_id, "--json").stdout)
    assert shown["nodes"] == 2 and shown["queued_reason"] and job_id in prefq(stack, "list").stdout
    assert run_processes(job_id) == [], "nothing of a job that waits for its nodes runs, the lost node's rank neither"
    events = stack.get(f"/jobs/{job_id}/events?limit=1000")["data"]
    assert not [e for e in events if e["type"] in ("error", "failed")], "a lost node is no failure of the job"
    requeued = [e["data"] for e in events if e["type"] == "requeued"]
    assert requeued[0] == {"interrupted_attempt": 1} and "unplaced_attempt" in requeued[-1], requeued
    saved = max(c["step"] for c in stack.get(f"/jobs/{job_id}/checkpoints")["data"])

    ray_nodes.add_node()

    def started() -> list[dict]:
        return [e["data"] for e in stack.get(f"/jobs/{job_id}/events?limit=1000")["data"] if e["type"] == "started"]

    wait(lambda: len(started()) == 2, 120, "the attempt placed on the new node", every_s=0.5)
    assert started()[-1]["resumed_from_step"] == saved >= 4
    assert job()["queued_reason"] is None and job()["status"] == "running"
    assert prefq(stack, "cancel", job_id).returncode == 0
    assert stack.wait_for(job_id, {"cancelled", "failed", "succeeded"})["status"] == "cancelled"
    wait(lambda: run_processes(job_id) == [], 30, "no process of the cancelled job")
    assert prefq(stack, "retry", job_id).returncode == 0
    retried = job()["attempt"]

    def placed() -> bool:
        events = stack.get(f"/jobs/{job_id}/events?limit=1000")["data"]
        return any(e["type"] == "placed" and e["attempt"] == retried for e in events)

    wait(placed, 120, "the retried attempt placed", every_s=0.3)  # cancelled while its ranks start
    assert prefq(stack, "cancel", job_id).returncode == 0
    assert stack.wait_for(job_id, {"cancelled", "failed", "succeeded"})["status"] == "cancelled"
    wait(lambda: run_processes(job_id) == [], 30, "no process of the cancelled job")


@pytest.mark.long
def test_a_reinforcement_job_runs_across_two_nodes(stack, ray_nodes, rft):
    """GRPO on fsdp across the session's two Ray nodes, graded by a `string_check` grader (which runs in each rank;
    python graders and judges are refused across nodes): it samples, grades, checkpoints and succeeds."""
    from tests.services import GRADER
    from tests.test_grpo import GRPO

    body = {
        "model": rft.model,
        "dataset": rft.file.id,
        "method": "grpo",
        "trainer": "fsdp",
        "gpus": 1,
        "nodes": 2,
        "hyperparameters": {**GRPO, "grader": GRADER, "max_steps": 8, "save_steps": 4, "logging_steps": 4}
        | {"sample_prompts": 0},
    }
    created = rft.native.post("/jobs", json=body)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    done = stack.wait_for(job_id, {"succeeded", "failed", "cancelled"})
    assert done["status"] == "succeeded" and done["nodes"] == 2 and done["step"] == 8, done
    events = stack.get(f"/jobs/{job_id}/events?limit=1000")["data"]
    assert [e["data"]["parallelism"]["processes"] for e in events if e["type"] == "started"] == [2]
    progress = [e["data"]["metrics"] for e in events if e["type"] == "progress"]
    assert progress and all("reward" in m for m in progress), progress
    wait(lambda: run_processes(job_id) == [], 30, "no process of the finished job")

    judge = {**body["hyperparameters"], "sample_judge": "x", "sample_prompts": 4}
    judged = rft.native.post("/jobs", json={**body, "hyperparameters": judge})
    assert judged.status_code == 422 and "hyperparameters.sample_judge: " in judged.text, judged.text


def test_a_killed_launcher_leaves_no_rank_on_any_node(ray_nodes, micro_model, toy_dpo, tmp_path):
    """The launcher of a two-node run SIGKILLed (no goodbye: an OOM kill, a lost worker pod): Ray ends the actors of
    the driver that died, and each rank dies with its actor, so no rank is left on either node."""
    import signal

    from tests.conftest import start_cold

    cluster = {"address": ray_nodes.address, "name": "prefq-killed-1", "placement_timeout_s": 30}
    spec = dpo_spec(micro_model, toy_dpo, max_steps=5000, eval_fraction=0, trainer="fsdp", gpus=2, nodes=2)
    launcher = start_cold(spec | {"cluster": cluster}, tmp_path / "run")
    for line in launcher.stdout:
        if json.loads(line)["event"] == "placed":
            break
    spec_path = launcher.args[4]

    def ranks() -> list[psutil.Process]:
        found = [p for p in psutil.process_iter(["cmdline"]) if spec_path in (p.info["cmdline"] or [])]
        return [p for p in found if p.pid != launcher.pid and p.status() != psutil.STATUS_ZOMBIE]

    wait(lambda: len(ranks()) == 2, 60, "a rank on each node", every_s=0.2)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    wait(lambda: ranks() == [], 60, "the ranks gone with their actors", every_s=0.5)
