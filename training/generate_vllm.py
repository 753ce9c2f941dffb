"""`python -m training generate MODEL --engine vllm`: `training.generate`'s protocol over vLLM's engine.

The same lines in and out as the transformers engine (see `training.generate`): requests with `messages` or
`prompt`, sampling, limits, stop strings, logit bias and a LoRA `adapter`; `{"cancel": ID}`; deltas, then `done`, or
one `error`. vLLM schedules the requests itself (continuous batching, paged KV cache) and serves LoRA adapters on the
one base (`enable_lora`: up to `--batch` adapters in a batch, the rest kept on the CPU by its LRU).

It needs vLLM installed with CUDA; without either, the process answers one `model_unavailable` error that says so
and exits 2. The transformers engine stays the default and the one the tests run; `bench/gpu_check.sh` runs this
one where the GPU machine has vLLM.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections import OrderedDict

from training.events import claim_stdout
from training.generate import RequestError, checked, requests_in, stop_ids, write
from training.warm import LEFT_OUT, leave_out

MAX_LORA_RANK = 64


def unavailable(message: str) -> int:
    write({"error": {"status": 500, "code": "model_unavailable", "message": message, "param": None}})
    return 2


class Engine:
    def __init__(self, model: str, revision: str | None, max_batch: int, adapter_mb: float):
        from transformers import AutoConfig, AutoTokenizer
        from vllm import AsyncEngineArgs, SamplingParams
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        self.SamplingParams, self.LoRARequest = SamplingParams, LoRARequest
        self.tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
        config = AutoConfig.from_pretrained(model, revision=revision)
        self.max_positions = getattr(config, "max_position_embeddings", None)
        self.vocab_size = config.vocab_size
        args = AsyncEngineArgs(
            model=model,
            revision=revision,
            enable_lora=True,
            max_loras=max_batch,
            max_lora_rank=MAX_LORA_RANK,
            max_cpu_loras=max(max_batch, int(adapter_mb // 64)),  # adapters kept in CPU memory (about 64 MB each)
            max_num_seqs=max(max_batch, 8),
        )
        self.engine = AsyncLLM.from_engine_args(args)

        class Config:  # what `stop_ids` reads of a transformers model
            generation_config = type("G", (), {"eos_token_id": getattr(config, "eos_token_id", None)})

        self.eos = stop_ids(Config, self.tokenizer)
        self.adapters: OrderedDict[str, int] = OrderedDict()  # name -> vLLM's integer id
        self.next_id = 1
        self.tasks: dict[str, asyncio.Task] = {}

    def lora(self, spec: dict | None):
        if not spec:
            return None
        name = str(spec.get("name"))
        if name not in self.adapters:
            self.adapters[name] = self.next_id
            self.next_id += 1
        self.adapters.move_to_end(name)
        return self.LoRARequest(name, self.adapters[name], str(spec.get("folder")))

    async def answer(self, req: dict) -> None:
        rid = req.get("id")
        try:
            asked = checked(req, self.tokenizer, self.max_positions, self.vocab_size)
            params = self.SamplingParams(
                max_tokens=asked["max_tokens"],
                temperature=asked["temperature"],
                top_p=asked["top_p"],
                seed=req.get("seed"),
                stop=asked["stops"] or None,
                stop_token_ids=self.eos,
                logit_bias=asked["bias"] or None,
            )
            sent, out = "", None
            stream = self.engine.generate(
                {"prompt_token_ids": asked["prompt"]}, params, rid, lora_request=self.lora(req.get("adapter"))
            )
            async for out in stream:
                text = out.outputs[0].text
                if len(text) > len(sent) and not text.endswith("\ufffd"):
                    write({"id": rid, "delta": text[len(sent) :]})
                    sent = text
            if out is None:
                raise RequestError(500, "generation_failed", "the engine gave no output")
            final = out.outputs[0]
            if len(final.text) > len(sent):
                write({"id": rid, "delta": final.text[len(sent) :]})
            write(
                {
                    "id": rid,
                    "done": True,
                    "finish_reason": "length" if final.finish_reason == "length" else "stop",
                    "prompt_tokens": len(asked["prompt"]),
                    "completion_tokens": len(final.token_ids),
                }
            )
        except asyncio.CancelledError:
            await self.engine.abort(rid)
            write({"id": rid, "done": True, "finish_reason": "cancelled", "prompt_tokens": 0, "completion_tokens": 0})
        except RequestError as exc:
            write(exc.line(rid))
        except Exception as exc:  # noqa: BLE001 - one bad request must not end the process
            write(RequestError(500, "generation_failed", f"{type(exc).__name__}: {exc}").line(rid))
        finally:
            self.tasks.pop(rid, None)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        requests: asyncio.Queue = asyncio.Queue()

        def read() -> None:
            for req in requests_in(sys.stdin):
                loop.call_soon_threadsafe(requests.put_nowait, req)
            loop.call_soon_threadsafe(requests.put_nowait, None)

        threading.Thread(target=read, daemon=True).start()
        while (req := await requests.get()) is not None:
            if "cancel" in req:
                task = self.tasks.get(req["cancel"])
                if task is not None:
                    task.cancel()
                continue
            self.tasks[req.get("id")] = loop.create_task(self.answer(req))
        for task in list(self.tasks.values()):
            task.cancel()
        self.engine.shutdown()


def main(model: str, revision: str | None = None, max_batch: int = 8, adapter_mb: float = 2048.0) -> int:
    claim_stdout()
    leave_out(set(LEFT_OUT) - {"bitsandbytes"})  # vLLM may quantize with it
    try:
        import vllm  # noqa: F401
    except ImportError:
        return unavailable("prefq serve --engine vllm needs the vllm package installed with CUDA (pip install vllm)")
    import torch

    if not torch.cuda.is_available():
        return unavailable("prefq serve --engine vllm needs a CUDA GPU; this machine has none (use the default engine)")
    return asyncio.run(_run(model, revision, max_batch, adapter_mb))


async def _run(model: str, revision: str | None, max_batch: int, adapter_mb: float) -> int:
    try:  # in the loop: vLLM's engine starts its output handler on the running loop
        engine = Engine(model, revision, max_batch, adapter_mb)
    except Exception as exc:  # noqa: BLE001 - whatever vLLM raises for a model it cannot load
        return unavailable(f"vLLM does not load the model: {type(exc).__name__}: {exc}")
    write(
        {
            "ready": True,
            "device": "cuda",
            "engine": "vllm",
            "max_positions": engine.max_positions,
            "chat_template": bool(engine.tokenizer.chat_template),
            "batch": max_batch,
        }
    )
    await engine.serve()
    return 0
