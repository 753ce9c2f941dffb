"""On a CUDA device (`bench/gpu_check.sh` runs these; elsewhere they are skipped, saying so): padding-free DPO
through PyTorch's flash varlen kernel, the tiled LM head's memory at Qwen's vocabulary, real runs (one forked by a
warm starter), and the memory estimate against the allocator."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import dpo_spec, of_type, run_training
from tests.test_dpo import make_trainer, outputs_and_gradient
from training.logprobs import CompletionLogProbs
from training.packing import varlen_attention
from training.spec import EXIT_OK

pytestmark = pytest.mark.cuda


def test_varlen_attention_matches_causal_sdpa_per_sequence():
    """bf16, grouped-query heads (8 query, 2 key-value), sequences of 5 to 1024 tokens in one row: the flash varlen
    kernel's output and gradients against fp32 sdpa run on each sequence alone."""
    torch.manual_seed(0)
    lengths = [5, 300, 77, 1024, 1]
    n, heads, kv_heads, dim = sum(lengths), 8, 2, 64
    q = torch.randn(1, heads, n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    out, _ = varlen_attention(None, q, k, v, None, scaling=dim**-0.5, cu_seq_lens_q=cu, max_length_q=max(lengths))
    assert out.shape == (1, n, heads, dim)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad((out * upstream).float().sum(), (q, k, v))

    parts = [
        F.scaled_dot_product_attention(qs.float(), ks.float(), vs.float(), is_causal=True, enable_gqa=True)
        for qs, ks, vs in zip(*(x.split(lengths, dim=2) for x in (q, k, v)), strict=True)
    ]
    expected = torch.cat(parts, dim=2).transpose(1, 2)
    expected_grads = torch.autograd.grad((expected * upstream.float()).sum(), (q, k, v))
    assert (out.float() - expected).abs().max() < 2e-2
    for ours, theirs in zip(grads, expected_grads, strict=True):
        assert (ours.float() - theirs.float()).norm() / theirs.float().norm() < 2e-2


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-4), ("bf16", 0.05)])
def test_packed_batches_give_the_padded_numbers_on_cuda(tmp_path, micro_model, mixed_dpo, precision, tolerance):
    """The basic trainer on CUDA: bf16 packs through the flash varlen kernel, fp32 through per-sequence sdpa."""
    trainer = make_trainer(tmp_path, micro_model, mixed_dpo, precision=precision)
    assert trainer.packed and trainer.args.device.type == "cuda"
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    mask = batch["completion_mask"][:, 1:].bool()
    packed, packed_grad = outputs_and_gradient(trainer, batch, trainer._policy_outputs)
    trainer.packed = False
    padded, padded_grad = outputs_and_gradient(trainer, batch, trainer._policy_outputs)
    assert torch.allclose(packed.log_probs[mask], padded.log_probs[mask], atol=tolerance)
    assert (packed_grad - padded_grad).norm() / padded_grad.norm() < tolerance


def test_lm_head_memory_stays_bounded_at_qwens_vocabulary():
    """Qwen2.5-0.5B's head (151,936 x 896) on 8,192 completion tokens: the whole fp32 log-softmax would be 4.6 GiB.
    Tiled, the forward and backward allocate under 2.5 GiB beyond the inputs (the bf16 copy of the head, its fp32
    gradient and a few 128 MiB tiles), and the log-probs are log_softmax's."""
    torch.manual_seed(0)
    vocab, hidden_size, n = 151936, 896, 8192
    hidden = torch.randn(n, hidden_size, device="cuda", requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, device="cuda") * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (n,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logp, *_ = CompletionLogProbs.apply(hidden, weight, targets, torch.bfloat16)
    logp.sum().backward()
    torch.cuda.synchronize()
    assert (torch.cuda.max_memory_allocated() - baseline) / 2**30 < 2.5
    assert n * vocab * 4 / 2**30 > 4.6
    with torch.no_grad():
        rows = slice(0, 256)
        logits = hidden[rows].bfloat16() @ weight.bfloat16().t()
        expected = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[rows, None]).squeeze(1)
    assert torch.allclose(logp[rows], expected, atol=2e-2)
    assert weight.grad.isfinite().all() and hidden.grad.isfinite().all()


def test_a_dpo_run_on_cuda_trains_and_caches_its_reference(tmp_path, micro_model, toy_dpo):
    spec = dpo_spec(micro_model, toy_dpo, max_steps=20, eval_steps=20, ref_cache_dir=str(tmp_path / "cache"))
    rc, events = run_training(spec, tmp_path / "run")
    assert rc == EXIT_OK, events[-1]
    assert [e["cached"] for e in of_type(events, "ref_logprobs")] == [False, False]
    losses = [e["loss"] for e in of_type(events, "progress")]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert of_type(events, "eval")[-1]["metrics"]["eval_rewards/accuracies"] >= 0.9


def test_a_warm_run_trains_on_the_gpu_its_server_never_touched(tmp_path, micro_model, toy_dpo):
    """A worker's warm starter runs with no CUDA device visible and must not load the CUDA driver in its imports
    (a forked child cannot use CUDA that its parent started); the run it forks is given device 0 and trains there."""
    import json
    import os

    from tests.conftest import ROOT, python_env
    from training.warm import WarmStarter

    env = {k: v for k, v in python_env().items() if k != "PYTEST_CURRENT_TEST"}
    starter = WarmStarter(dict(env, CUDA_VISIBLE_DEVICES=""), ROOT)
    try:
        assert starter.ready(180), f"the warm starter refused to serve: {starter.problem}"
        (tmp_path / "spec.json").write_text(json.dumps(dpo_spec(micro_model, toy_dpo, max_steps=10)))
        with open(tmp_path / "events.jsonl", "wb") as out, open(os.devnull, "wb") as err:
            run = starter.start(
                ["run", "spec.json", "--out", str(tmp_path / "run")],
                dict(env, CUDA_VISIBLE_DEVICES="0"),
                tmp_path,
                out.fileno(),
                err.fileno(),
            )
        assert run.wait(300) == EXIT_OK
        events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
        assert of_type(events, "memory")[0]["device"] == "cuda", events[-3:]
    finally:
        starter.close()


@pytest.mark.parametrize("lora", [None, {"quantize": "4bit"}], ids=["full", "qlora"])
def test_memory_estimate_against_the_cuda_allocators_peak(tmp_path, small_model, long_rows, lora):
    """QLoRA trains on CUDA (NF4 through bitsandbytes); the estimate of a run's peak per device, less the CUDA
    context that the allocator does not count, is within a quarter of the allocator's measured peak."""
    from training.memory import GIB, RUNTIME

    spec = dpo_spec(small_model, long_rows["dpo"], max_steps=2, batch_size=8, max_length=128)
    spec.update(sample_prompts=0, eval_fraction=0.05, **({"lora": lora} if lora else {}))
    code, events = run_training(spec, tmp_path / "out")
    assert code == EXIT_OK, of_type(events, "error")
    (memory,) = of_type(events, "memory")
    estimated = memory["estimated_gib"] - RUNTIME["cuda"] / GIB
    print(f"cuda {lora or 'full'}: estimated {estimated:.3f} GiB, allocator peak {memory['peak_gib']:.3f} GiB")
    assert memory["device"] == "cuda" and 0.75 <= estimated / memory["peak_gib"] <= 1.25, memory


def _lora_adapter(model, folder, seed: int) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model)
    get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(
        folder
    )


@pytest.mark.parametrize("engine", ["transformers", "vllm"])
def test_a_model_process_answers_batched_requests_with_adapters_on_the_gpu(engine, micro_model, tmp_path):
    """The serve's model process on CUDA (`--engine`): eight requests at once, two of them with LoRA adapters of the
    base, each answered to its end; the vLLM engine where vLLM is installed."""
    import json
    import subprocess
    import sys

    if engine == "vllm":
        pytest.importorskip("vllm", reason="vLLM is not installed on this GPU machine")
    for i in range(2):
        _lora_adapter(micro_model, tmp_path / f"adapter{i}", i)
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "training", "generate", str(micro_model), "--engine", engine],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready.get("ready") and ready["device"] == "cuda", ready
        for i in range(8):
            adapter = {"name": f"a{i}", "folder": str(tmp_path / f"adapter{i}")} if i < 2 else None
            req = {"id": f"r{i}", "prompt": f"What is {i} plus 2?", "max_tokens": 16, "temperature": 0}
            proc.stdin.write(json.dumps({**req, "adapter": adapter}) + "\n")
        proc.stdin.flush()
        done = {}
        while len(done) < 8:
            line = json.loads(proc.stdout.readline())
            assert "error" not in line, line
            if line.get("done"):
                done[line["id"]] = line
        assert all(d["completion_tokens"] > 0 for d in done.values()), done
    finally:
        proc.stdin.close()
        proc.wait(60)
