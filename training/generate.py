"""`python -m training generate MODEL_DIR`: one model loaded once, answering generation requests, one per line.

The process reads one JSON request per line on stdin and writes JSON lines on stdout (logs go to stderr); it
exits when stdin closes. Once the model is loaded it prints `{"ready": true, "device", "max_positions",
"chat_template"}` (or `{"error": ...}` and exits 2 when the folder does not load). A request:

| field | what |
| --- | --- |
| `id` | echoed on every line of the answer |
| `messages` or `prompt` | a list of `{"role", "content"}` (rendered with the tokenizer's chat template, or as `role: content` lines where it has none), or a text to continue |
| `max_tokens` | new tokens at most |
| `temperature`, `top_p` | sampling; temperature 0 is greedy |
| `seed` | makes sampling repeatable |
| `stop` | up to 4 strings: the text ends before the first one found (it is not part of the answer) |
| `logit_bias` | {token id: bias from -100 to 100}, added to the logits |

The answer: `{"id", "delta": TEXT}` lines as the text grows, then `{"id", "done": true, "finish_reason": "stop" |
"length", "prompt_tokens", "completion_tokens"}`; or one `{"id", "error": {"status", "code", "message",
"param"}}` line (an HTTP status for whoever relays it).
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

from training.events import claim_stdout, event_stream

# Tokens that end an assistant's turn in common chat templates (besides the tokenizer's eos): generation stops there
END_OF_TURN = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>")


class RequestError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


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


class Generator:
    def __init__(self, folder: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(self.device).eval()
        self.eos = stop_ids(self.model, self.tokenizer)
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]

    def _inputs(self, req: dict) -> tuple[list[int], str]:
        if req.get("messages") is not None:
            return render_messages(self.tokenizer, req["messages"]), "messages"
        return self.tokenizer(req.get("prompt") or "")["input_ids"], "prompt"

    def _processors(self, req: dict) -> list:
        from transformers import LogitsProcessor

        bias = {int(k): float(v) for k, v in (req.get("logit_bias") or {}).items()}
        if not bias:
            return []
        bad = [k for k in bias if not 0 <= k < self.vocab_size]
        if bad:
            raise RequestError(
                400,
                "invalid_logit_bias",
                f"logit_bias: token id {bad[0]} is not in the model's vocabulary (0 to {self.vocab_size - 1})",
                "logit_bias",
            )
        ids = self.torch.tensor(list(bias), device=self.device)
        values = self.torch.tensor(list(bias.values()), device=self.device)

        class Bias(LogitsProcessor):
            def __call__(self, input_ids, scores):
                scores[:, ids] += values.to(scores.dtype)
                return scores

        return [Bias()]

    def answer(self, req: dict) -> None:
        """Stream one request's answer as lines (see the module's docstring)."""
        from transformers import StoppingCriteria, TextIteratorStreamer

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
        stops = [s for s in req.get("stop") or [] if s]
        stopped = threading.Event()

        class Stopped(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return stopped.is_set()

        temperature = float(req.get("temperature", 1.0))
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": float(req.get("top_p", 1.0))}
            if (temperature > 0)
            else {"do_sample": False, "temperature": None, "top_p": None}
        )
        if req.get("seed") is not None:
            self.torch.manual_seed(int(req["seed"]))
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict = {}

        def run() -> None:
            try:
                with self.torch.inference_mode():
                    result["ids"] = self.model.generate(
                        self.torch.tensor([prompt], device=self.device),
                        max_new_tokens=max_tokens,
                        streamer=streamer,
                        eos_token_id=self.eos,
                        pad_token_id=self.tokenizer.pad_token_id or self.eos[0],
                        logits_processor=self._processors(req),
                        stopping_criteria=[Stopped()],
                        top_k=None,
                        attention_mask=self.torch.ones(1, len(prompt), dtype=self.torch.long, device=self.device),
                        **sampling,
                    )[0, len(prompt) :].tolist()
            except BaseException as exc:  # noqa: BLE001 - reported as the request's error below
                result["error"] = exc
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        text, sent, hold = "", 0, max((len(s) for s in stops), default=1) - 1
        for piece in streamer:
            text += piece
            hits = [i for i in (text.find(s) for s in stops) if i >= 0]
            if hits:  # the answer ends before the first stop string; generation stops at its next step
                text = text[: min(hits)]
                stopped.set()
                break
            if len(text) - hold > sent:
                write({"id": rid, "delta": text[sent : len(text) - hold]})
                sent = len(text) - hold
        thread.join()
        if "error" in result:
            raise result["error"]
        if len(text) > sent:
            write({"id": rid, "delta": text[sent:]})
        ids = result["ids"]
        ended = stopped.is_set() or (ids and ids[-1] in self.eos)
        write(
            {
                "id": rid,
                "done": True,
                "finish_reason": "stop" if ended or len(ids) < max_tokens else "length",
                "prompt_tokens": len(prompt),
                "completion_tokens": len(ids),
            }
        )


def main(folder: str) -> int:
    claim_stdout()
    if not (Path(folder) / "config.json").is_file():
        write({"error": {"status": 500, "code": "model_unavailable", "message": f"no model folder at {folder}"}})
        return 2
    try:
        gen = Generator(folder)
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises for a folder it cannot load
        write({"error": {"status": 500, "code": "model_unavailable", "message": f"the model does not load: {exc}"}})
        return 2
    write(
        {
            "ready": True,
            "device": gen.device,
            "max_positions": gen.max_positions,
            "chat_template": bool(gen.tokenizer.chat_template),
        }
    )
    for line in sys.stdin:
        rid = None
        try:
            req = json.loads(line)
            rid = req.get("id")
            gen.answer(req)
        except json.JSONDecodeError as exc:
            write(
                {
                    "id": None,
                    "error": {"status": 400, "code": "invalid_request", "message": f"not JSON: {exc}", "param": None},
                }
            )
        except RequestError as exc:
            write(
                {
                    "id": rid,
                    "error": {"status": exc.status, "code": exc.code, "message": exc.message, "param": exc.param},
                }
            )
        except Exception as exc:  # noqa: BLE001 - one bad request must not end the process
            write(
                {
                    "id": rid,
                    "error": {
                        "status": 500,
                        "code": "generation_failed",
                        "message": f"{type(exc).__name__}: {exc}",
                        "param": None,
                    },
                }
            )
    return 0
