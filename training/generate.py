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

**Batches.** Requests are answered together, up to `--batch` of them: prompts left-padded into one tensor, one
forward per new token for all of them, each row with its own sampling, limits, stop strings and adapter (PEFT's
mixed-adapter batches). A row leaves the batch as soon as it ends; a request that arrives meanwhile joins it at the
next token (continuous batching: its prompt goes through the model alone, then its cache is padded into the
batch's), so concurrent users wait for about one batch, not for each other.

**Adapters** are loaded on first use and kept while their weights fit in `--adapter-mb`, the least recently used
evicted first; the model's own weights are loaded once, whatever the number of adapters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from training.events import claim_stdout, event_stream
from training.warm import LEFT_OUT, leave_out

# Tokens that end an assistant's turn in common chat templates (besides the tokenizer's eos): generation stops there
END_OF_TURN = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>")
log = logging.getLogger("training.generate")
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


def write(line: dict, flush: bool = True) -> None:
    out = event_stream()
    out.write(json.dumps(line) + "\n")
    if flush:
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


def checked(req: dict, tokenizer, max_positions: int | None, vocab_size: int) -> dict:
    """A request's fields checked against the model (`RequestError` names the one that is wrong): `id`, `prompt`
    (token ids), `max_tokens`, `temperature`, `top_p`, `stops`, `bias` ({token id: bias}). Both engines use it."""
    if req.get("messages") is not None:
        prompt, param = render_messages(tokenizer, req["messages"]), "messages"
    else:
        prompt, param = tokenizer(req.get("prompt") or "")["input_ids"], "prompt"
    max_tokens = int(req.get("max_tokens") or 16)
    if not prompt:
        raise RequestError(400, "invalid_request", f"{param}: empty (no tokens to continue)", param)
    if max_positions and len(prompt) + max_tokens > max_positions:
        raise RequestError(
            400,
            "context_length_exceeded",
            f"this model's context is {max_positions} tokens; "
            f"{param} is {len(prompt)} tokens and max_tokens asks for {max_tokens} more",
            param,
        )
    bias = {int(k): float(v) for k, v in (req.get("logit_bias") or {}).items()}
    bad = [k for k in bias if not 0 <= k < vocab_size]
    if bad:
        raise RequestError(
            400,
            "invalid_logit_bias",
            f"logit_bias: token id {bad[0]} is not in the model's vocabulary (0 to {vocab_size - 1})",
            "logit_bias",
        )
    return {
        "id": req.get("id"),
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": float(req.get("temperature", 1.0)),
        "top_p": float(req.get("top_p", 1.0)),
        "stops": [s for s in req.get("stop") or [] if s],
        "bias": bias,
    }


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


def positions_all(mask):
    """Position ids of left-padded rows: 0 at each row's first real token."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@dataclass
class Running:
    """A batch under way: its rows, their KV cache (left-padded), attention mask and last positions."""

    rows: list[Row]
    cache: object
    mask: object
    positions: object  # [rows, 1]: each row's position of its last token

    def keep(self, going: list[int], torch) -> None:
        if len(going) < len(self.rows):
            index = torch.tensor(going, dtype=torch.long, device=self.mask.device)
            if going:
                self.cache.batch_select_indices(index)
            self.mask, self.positions = self.mask[index], self.positions[index]
            self.rows = [self.rows[i] for i in going]

    def joinable(self) -> bool:
        """Whether rows can join: every layer of the cache is a plain growing one (not a sliding window's)."""
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer and layer.is_initialized for layer in self.cache.layers)

    def join(self, other: Running, torch) -> Running:
        """Both batches as one: the shorter one's cache and mask padded on the left."""
        if not other.rows:
            return self
        if not self.rows:
            return other
        width = max(self.mask.shape[1], other.mask.shape[1])

        def pad(t, dim: int):
            missing = width - t.shape[dim]
            if not missing:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)])
            mine.values = torch.cat([pad(mine.values, 2), pad(theirs.values, 2)])
        self.mask = torch.cat([pad(self.mask, 1), pad(other.mask, 1)])
        self.positions = torch.cat([self.positions, other.positions])
        self.rows = self.rows + other.rows
        return self


class Generator:
    def __init__(self, model: str, revision: str | None = None, adapter_mb: float = 2048.0, max_batch: int = 8):
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
        self.max_batch = max_batch

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
            log.info("Adapter %s unloaded: the adapters kept are within --adapter-mb", old)
        log.info("Adapter %s loading (%d bytes)", name, size)
        try:
            if self.model is self.base:
                from peft import PeftModel

                self.model = PeftModel.from_pretrained(self.base, folder, adapter_name=name).eval()
            else:
                self.model.load_adapter(folder, adapter_name=name)
                self.model.set_adapter(name)  # the active one may have been unloaded; batches name theirs per row
                self.model.eval()
        except Exception as exc:  # noqa: BLE001 - whatever PEFT raises for an adapter that does not fit this model
            raise RequestError(
                500, "model_unavailable", f"the adapter does not load on its base model: {exc}", "model"
            ) from None
        self.adapters[name] = size
        return name

    # -- requests --

    def row(self, req: dict, keep: set[str]) -> Row:
        """A request checked and ready for a batch (`RequestError` names what is wrong)."""
        asked = checked(req, self.tokenizer, self.max_positions, self.vocab_size)
        generator = None
        if req.get("seed") is not None:
            generator = self.torch.Generator(self.device).manual_seed(int(req["seed"]))
        return Row(**asked, adapter=self.adapter(req.get("adapter"), keep), generator=generator)

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
            write({"id": row.id, "delta": text[row.sent : end]}, flush=False)  # flushed once per step
            row.sent = end

    def _forward(self, rows: list[Row], ids, mask, positions, cache):
        extra = {"adapter_names": [r.adapter for r in rows]} if self.model is not self.base else {}
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True, **extra
        )
        return out.logits[:, -1, :]

    def _advance(self, rows: list[Row], logits, cancelled: set) -> list[int]:
        """Each row's next token, streamed; the indices of the rows still going."""
        going = []
        for i, row in enumerate(rows):
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
        event_stream().flush()  # the step's lines in one write
        return going

    def _prefill(self, rows: list[Row]):
        """The prompts of `rows`, left-padded, through the model: a batch of them and the logits of its next token."""
        from transformers import DynamicCache

        torch = self.torch
        width = max(len(r.prompt) for r in rows)
        ids = torch.tensor([[self.pad] * (width - len(r.prompt)) + r.prompt for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in rows], device=self.device)
        cache = DynamicCache()
        positions = positions_all(mask)
        return Running(rows, cache, mask, positions[:, -1:]), self._forward(rows, ids, mask, positions, cache)

    def run(self, rows: list[Row], cancelled: set, joining) -> None:
        """Answer `rows` together, one forward per token for every row still going; at each step, requests that
        arrived meanwhile (`joining(room)` gives them as rows) join the batch after their own prefill."""
        torch = self.torch
        running: Running | None = None
        with torch.inference_mode():
            while rows or running is not None:
                if rows:
                    new, logits = self._prefill(rows)
                    new.keep(self._advance(new.rows, logits, cancelled), torch)
                    running = new if running is None else running.join(new, torch)
                    rows = []
                if running is None or not running.rows:
                    return
                ids = torch.tensor([[r.ids[-1]] for r in running.rows], device=self.device)
                running.mask = torch.cat([running.mask, running.mask.new_ones(len(running.rows), 1)], dim=1)
                running.positions = running.positions + 1
                logits = self._forward(running.rows, ids, running.mask, running.positions, running.cache)
                running.keep(self._advance(running.rows, logits, cancelled), torch)
                if running.rows and running.joinable():
                    rows = joining(self.max_batch - len(running.rows), {r.adapter for r in running.rows})
                elif not running.rows:
                    running = None

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


def requests_in(lines) -> Iterator[dict]:
    """The JSON objects of `lines` (stdin's: requests and cancels); a line that is not one is answered with an
    error and skipped. Both engines read their requests here."""
    for line in lines:
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            write(RequestError(400, "invalid_request", f"not a JSON object: {exc}").line(None))
            continue
        yield req


def _reader(requests: queue.Queue, cancelled: set) -> None:
    """stdin's lines: requests into `requests`, cancels into `cancelled`; None at the end."""
    for req in requests_in(sys.stdin):
        if "cancel" in req:
            cancelled.add(req["cancel"])
        else:
            requests.put(req)
    requests.put(None)


def serve(gen: Generator) -> None:
    requests: queue.Queue = queue.Queue()
    cancelled: set = set()
    threading.Thread(target=_reader, args=(requests, cancelled), daemon=True).start()
    ended = False

    def rows(reqs: list[dict], keep: set[str]) -> list[Row]:
        """The requests checked (errors answered) as rows."""
        keep = keep | {adapter_name(str(r["adapter"].get("name"))) for r in reqs if isinstance(r.get("adapter"), dict)}
        ready = []
        for req in reqs:
            rid = req.get("id")
            if rid in cancelled:  # its client left while it waited
                cancelled.discard(rid)
                continue
            try:
                ready.append(gen.row(req, keep))
            except RequestError as exc:
                write(exc.line(rid))
            except Exception as exc:  # noqa: BLE001 - one bad request must not end the process
                write(RequestError(500, "generation_failed", f"{type(exc).__name__}: {exc}").line(rid))
        return ready

    def waiting(room: int, block: bool) -> list[dict]:
        nonlocal ended
        got = []
        while not ended and len(got) < room:
            try:
                req = requests.get(block=block and not got)
            except queue.Empty:
                break
            if req is None:
                ended = True
            else:
                got.append(req)
        return got

    answered: list[Row] = []  # the rows of the batch under way, and those that joined it

    def joining(room: int, keep: set[str]) -> list[Row]:
        joined = rows(waiting(room, block=False), keep)
        answered.extend(joined)
        return joined

    while not ended:
        batch = rows(waiting(gen.max_batch, block=True), set())
        if not batch:
            continue
        answered[:] = batch
        try:
            gen.run(batch, cancelled, joining)
        except Exception as exc:  # noqa: BLE001 - the batch's unfinished requests fail; the process goes on
            log.exception("A batch failed")
            for row in answered:
                if row.finish is None:
                    write(RequestError(500, "generation_failed", f"{type(exc).__name__}: {exc}").line(row.id))
        cancelled.clear()  # every request that was cancelled has ended


def main(model: str, revision: str | None = None, max_batch: int = 8, adapter_mb: float = 2048.0) -> int:
    claim_stdout()
    leave_out(LEFT_OUT)  # a served model is neither quantized nor tracked (PEFT would import bitsandbytes: 1 to 2 s)
    log.setLevel(logging.INFO)  # adapters loaded and unloaded are worth a line in the serve's log
    if (model.startswith("/") or Path(model).is_dir()) and not (Path(model) / "config.json").is_file():
        write({"error": {"status": 500, "code": "model_unavailable", "message": f"no model folder at {model}"}})
        return 2
    try:
        gen = Generator(model, revision, adapter_mb, max_batch)
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
    serve(gen)
    return 0
