"""`python -m training generate MODEL`: one model loaded once, answering generation requests in batches, with LoRA
adapters of that model loaded on top of it as requests name them.

MODEL is a model folder or a hub id (`--revision`). The process reads JSON lines on stdin and writes JSON lines on
stdout (logs go to stderr); it exits when stdin closes. Once the model is loaded it prints `{"ready": true,
"device", "max_positions", "chat_template", "batch"}` (or `{"error": ...}` and exits 2 when the model does not
load). A request:

| field | what |
| --- | --- |
| `id` | echoed on every line of the answer |
| `messages` or `prompt` | a list of `{"role", "content"}` (rendered with the tokenizer's chat template, or as `role: content` lines where it has none), or a text to continue |
| `max_tokens` | new tokens at most |
| `temperature`, `top_p` | sampling; temperature 0 is greedy |
| `seed` | makes sampling repeatable |
| `stop` | up to 4 strings: the text ends before the first one found (it is not part of the answer) |
| `logit_bias` | {token id: bias from -100 to 100}, added to the logits |
| `adapter` | `{"name", "folder"}`: a PEFT LoRA adapter of this model to answer with (absent: the model itself) |

`{"cancel": ID}` stops that request's answer at the next token (its client left, or its time ran out).

The answer: `{"id", "delta": TEXT}` lines as the text grows, then `{"id", "done": true, "finish_reason": "stop" |
"length" | "cancelled", "prompt_tokens", "completion_tokens"}`; or one `{"id", "error": {"status", "code",
"message", "param"}}` line (an HTTP status for whoever relays it).

**Batches.** Requests that wait when a batch starts (up to `--batch` of them) are answered together: prompts
left-padded into one tensor, one forward per new token for all of them, each row with its own sampling, limits,
stop strings and adapter (PEFT's mixed-adapter batches), a row leaving the batch as soon as it ends. Requests
that arrive meanwhile wait for the next batch.

**Adapters** are loaded on first use and kept while their weights fit in `--adapter-mb`, the least recently used
evicted first; the model's own weights are loaded once, whatever the number of adapters.
"""

from __future__ import annotations

import hashlib
import json
import queue
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from training.events import claim_stdout, event_stream
from training.warm import LEFT_OUT, leave_out

# Tokens that end an assistant's turn in common chat templates (besides the tokenizer's eos): generation stops there
END_OF_TURN = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>")
BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


class RequestError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param

    def line(self, rid) -> dict:
        return {
            "id": rid,
            "error": {"status": self.status, "code": self.code, "message": self.message, "param": self.param},
        }


def write(line: dict) -> None:
    out = event_stream()
    out.write(json.dumps(line) + "\n")
    out.flush()


def render_messages(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation, ending where the assistant's reply begins."""
    if tokenizer.chat_template:
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template raises (jinja's raise_exception) on what it refuses
            raise RequestError(
                400, "invalid_messages", f"the model's chat template refuses these messages: {exc}", "messages"
            ) from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text)["input_ids"]


def stop_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return sorted(ids)


def adapter_name(folder_key: str) -> str:
    """A PEFT adapter name (a module key: no dots) for an adapter's identity."""
    return "a" + hashlib.sha256(folder_key.encode()).hexdigest()[:16]


def folder_bytes(folder: str) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) or sum(
        p.stat().st_size for p in Path(folder).glob("*.bin")
    )


@dataclass
class Row:
    """One request in a batch."""

    id: str
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stops: list[str]
    bias: dict[int, float]
    adapter: str  # a loaded adapter's name, or BASE
    generator: object = None  # a seeded torch.Generator, or None
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    finish: str | None = None


class Generator:
    def __init__(self, model: str, revision: str | None = None, adapter_mb: float = 2048.0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
        self.base = AutoModelForCausalLM.from_pretrained(model, revision=revision, dtype=dtype).to(self.device).eval()
        self.model = self.base  # a PeftModel around it once an adapter is loaded
        self.eos = stop_ids(self.base, self.tokenizer)
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos[0]
        self.max_positions = getattr(self.base.config, "max_position_embeddings", None)
        self.vocab_size = self.base.get_output_embeddings().weight.shape[0]
        self.adapters: OrderedDict[str, int] = OrderedDict()  # name -> bytes, least recently used first
        self.adapter_budget = int(adapter_mb * 1e6)

    # -- adapters --

    def adapter(self, spec: dict | None, keep: set[str]) -> str:
        """The loaded adapter's name for a request's `adapter` (loading it, evicting others not in `keep`)."""
        if not spec:
            return BASE
        name = adapter_name(str(spec.get("name")))
        if name in self.adapters:
            self.adapters.move_to_end(name)
            return name
        folder = str(spec.get("folder") or "")
        if not (Path(folder) / "adapter_config.json").is_file():
            raise RequestError(500, "model_unavailable", "the adapter's folder has no adapter_config.json", "model")
        size = folder_bytes(folder)
        for old in [n for n in self.adapters if n not in keep]:
            if sum(self.adapters.values()) + size <= self.adapter_budget:
                break
            self.model.delete_adapter(old)
            del self.adapters[old]
        try:
            if self.model is self.base:
                from peft import PeftModel

                self.model = PeftModel.from_pretrained(self.base, folder, adapter_name=name).eval()
            else:
                self.model.load_adapter(folder, adapter_name=name)
                self.model.eval()
        except Exception as exc:  # noqa: BLE001 - whatever PEFT raises for an adapter that does not fit this model
            raise RequestError(
                500, "model_unavailable", f"the adapter does not load on its base model: {exc}", "model"
            ) from None
        self.adapters[name] = size
        return name

    # -- requests --

    def _inputs(self, req: dict) -> tuple[list[int], str]:
        if req.get("messages") is not None:
            return render_messages(self.tokenizer, req["messages"]), "messages"
        return self.tokenizer(req.get("prompt") or "")["input_ids"], "prompt"

    def row(self, req: dict, keep: set[str]) -> Row:
        """A request checked and ready for a batch (`RequestError` names what is wrong)."""
        rid, max_tokens = req.get("id"), int(req.get("max_tokens") or 16)
        prompt, param = self._inputs(req)
        if not prompt:
            raise RequestError(400, "invalid_request", f"{param}: empty (no tokens to continue)", param)
        if self.max_positions and len(prompt) + max_tokens > self.max_positions:
            raise RequestError(
                400,
                "context_length_exceeded",
                f"this model's context is {self.max_positions} tokens; "
                f"{param} is {len(prompt)} tokens and max_tokens asks for {max_tokens} more",
                param,
            )
        bias = {int(k): float(v) for k, v in (req.get("logit_bias") or {}).items()}
        bad = [k for k in bias if not 0 <= k < self.vocab_size]
        if bad:
            raise RequestError(
                400,
                "invalid_logit_bias",
                f"logit_bias: token id {bad[0]} is not in the model's vocabulary (0 to {self.vocab_size - 1})",
                "logit_bias",
            )
        generator = None
        if req.get("seed") is not None:
            generator = self.torch.Generator(self.device).manual_seed(int(req["seed"]))
        return Row(
            id=rid,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=float(req.get("temperature", 1.0)),
            top_p=float(req.get("top_p", 1.0)),
            stops=[s for s in req.get("stop") or [] if s],
            bias=bias,
            adapter=self.adapter(req.get("adapter"), keep),
            generator=generator,
        )

    def _pick(self, row: Row, logits) -> int:
        torch = self.torch
        scores = logits.float()
        if row.bias:
            ids = torch.tensor(list(row.bias), device=scores.device)
            scores[ids] += torch.tensor(list(row.bias.values()), device=scores.device)
        if row.temperature <= 0:
            return int(scores.argmax())
        probs = torch.softmax(scores / row.temperature, dim=-1)
        if row.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            cut = sorted_p.cumsum(-1) - sorted_p >= row.top_p  # keep the smallest set whose mass reaches top_p
            sorted_p[cut] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _stream(self, row: Row, done: bool) -> None:
        """Write the text that is certain: what no stop string may still cut, and no half of a character."""
        text = self.tokenizer.decode([t for t in row.ids if t not in self.eos], skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in row.stops) if i >= 0]
        if hits:  # the answer ends before the first stop string
            text, row.finish, done = text[: min(hits)], "stop", True
        hold = 0 if done else max((len(s) for s in row.stops), default=1) - 1
        if not done and text.endswith("\ufffd"):
            hold = max(hold, 1)
        end = max(row.sent, len(text) - hold)
        if end > row.sent:
            write({"id": row.id, "delta": text[row.sent : end]})
            row.sent = end

    def run(self, rows: list[Row], cancelled: set) -> None:
        """Answer `rows` together: one forward per token for every row still going."""
        torch = self.torch
        width = max(len(r.prompt) for r in rows)
        ids = torch.tensor([[self.pad] * (width - len(r.prompt)) + r.prompt for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in rows], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache

        cache = DynamicCache()
        live = list(rows)
        with torch.inference_mode():
            while live:
                extra = {"adapter_names": [r.adapter for r in live]} if self.model is not self.base else {}
                out = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                    **extra,
                )
                logits = out.logits[:, -1, :]
                going = []
                for i, row in enumerate(live):
                    if row.id in cancelled:
                        row.finish = "cancelled"
                    else:
                        token = self._pick(row, logits[i])
                        row.ids.append(token)
                        if token in self.eos:
                            row.finish = "stop"
                        elif len(row.ids) >= row.max_tokens:
                            row.finish = "length"
                        self._stream(row, row.finish is not None)
                    if row.finish is None:
                        going.append(i)
                    else:
                        self._done(row)
                if not going:
                    return
                if len(going) < len(live):
                    keep = torch.tensor(going, device=self.device)
                    cache.batch_select_indices(keep)
                    mask, positions = mask[keep], positions[keep]
                    live = [live[i] for i in going]
                ids = torch.tensor([[r.ids[-1]] for r in live], device=self.device)
                mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
                positions = positions[:, -1:] + 1

    def _done(self, row: Row) -> None:
        write(
            {
                "id": row.id,
                "done": True,
                "finish_reason": row.finish,
                "prompt_tokens": len(row.prompt),
                "completion_tokens": len(row.ids),
            }
        )


def _reader(requests: queue.Queue, cancelled: set) -> None:
    """stdin's lines: requests into `requests`, cancels into `cancelled`; None at the end."""
    for line in sys.stdin:
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            write(RequestError(400, "invalid_request", f"not a JSON object: {exc}").line(None))
            continue
        if "cancel" in req:
            cancelled.add(req["cancel"])
        else:
            requests.put(req)
    requests.put(None)


def serve(gen: Generator, max_batch: int) -> None:
    requests: queue.Queue = queue.Queue()
    cancelled: set = set()
    threading.Thread(target=_reader, args=(requests, cancelled), daemon=True).start()
    ending = False
    while not ending:
        batch = [requests.get()]
        while len(batch) < max_batch:
            try:
                batch.append(requests.get_nowait())
            except queue.Empty:
                break
        ending = None in batch
        rows: list[Row] = []
        keep = {adapter_name(str(r["adapter"].get("name"))) for r in batch if r and isinstance(r.get("adapter"), dict)}
        for req in filter(None, batch):
            rid = req.get("id")
            if rid in cancelled:  # its client left while it waited
                cancelled.discard(rid)
                continue
            try:
                rows.append(gen.row(req, keep))
            except RequestError as exc:
                write(exc.line(rid))
            except Exception as exc:  # noqa: BLE001 - one bad request must not end the process
                write(RequestError(500, "generation_failed", f"{type(exc).__name__}: {exc}").line(rid))
        if rows:
            try:
                gen.run(rows, cancelled)
            except Exception as exc:  # noqa: BLE001 - the batch's requests fail; the process goes on
                for row in rows:
                    if row.finish is None:
                        write(RequestError(500, "generation_failed", f"{type(exc).__name__}: {exc}").line(row.id))
        cancelled.difference_update(r.id for r in rows)


def main(model: str, revision: str | None = None, max_batch: int = 8, adapter_mb: float = 2048.0) -> int:
    claim_stdout()
    leave_out(LEFT_OUT)  # a served model is neither quantized nor tracked (PEFT would import bitsandbytes: 1 to 2 s)
    if (model.startswith("/") or Path(model).is_dir()) and not (Path(model) / "config.json").is_file():
        write({"error": {"status": 500, "code": "model_unavailable", "message": f"no model folder at {model}"}})
        return 2
    try:
        gen = Generator(model, revision, adapter_mb)
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises for a model it cannot load
        write({"error": {"status": 500, "code": "model_unavailable", "message": f"the model does not load: {exc}"}})
        return 2
    write(
        {
            "ready": True,
            "device": gen.device,
            "max_positions": gen.max_positions,
            "chat_template": bool(gen.tokenizer.chat_template),
            "batch": max_batch,
        }
    )
    serve(gen, max_batch)
    return 0
