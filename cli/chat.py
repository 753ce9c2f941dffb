"""`prefq chat MODEL`: talk to a fine-tuned model in the terminal, through the API's `/v1/chat/completions`.

Replies stream in as they are generated; the conversation is kept and sent again with each message. `--message`
sends one message, prints the reply and exits (scripts, tests).
"""

from __future__ import annotations

import json
import sys

import httpx
import typer

from cli.client import Client, ClientError
from cli.config import client
from cli.console import fail

HELP = "Type a message; /reset forgets the conversation, /exit (or Ctrl-D) leaves; Ctrl-C stops a reply."


def reply(c: Client, body: dict, out=sys.stdout) -> str:
    """Stream one reply to `out` as it comes; returns its text. A `ClientError` for an error answer."""
    try:
        with c.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}, timeout=None) as r:
            if r.status_code != 200:
                r.read()
                try:
                    raise ClientError(f"{r.json()['error']['code']}: {r.json()['error']['message']}")
                except (ValueError, KeyError, TypeError):
                    raise ClientError(f"HTTP {r.status_code}: {r.text[:500]}") from None
            parts = []
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise ClientError(f"{chunk['error']['code']}: {chunk['error']['message']}")
                for choice in chunk.get("choices", []):
                    text = choice["delta"].get("content") or ""
                    parts.append(text)
                    out.write(text)
                    out.flush()
            return "".join(parts)
    except httpx.TransportError as exc:
        raise ClientError(f"cannot reach the API at {c.base_url} ({exc})") from None


def chat(
    model: str = typer.Argument(..., help="A fine-tuned model (ft:...), a checkpoint of one, or a job id"),
    message: str = typer.Option(None, "--message", "-m", help="Send this one message, print the reply, exit"),
    system: str = typer.Option(None, help="A system message at the start of the conversation"),
    max_tokens: int = typer.Option(None, help="New tokens per reply at most (default: the server's cap)"),
    temperature: float = typer.Option(None, help="0 is greedy; default 1"),
    seed: int = typer.Option(None, help="Makes sampled replies repeatable"),
) -> None:
    """Chat with a fine-tuned model: a REPL that streams the replies, or one --message."""
    c = client()
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    options = {
        k: v for k, v in {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}.items() if v is not None
    }
    if message is not None:
        try:
            reply(c, {"model": model, "messages": [*messages, {"role": "user", "content": message}], **options})
        except ClientError as exc:
            print()
            fail(str(exc))
        print()
        return
    print(f"{model}\n{HELP}")
    while True:
        try:
            text = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text.strip() in ("/exit", "/quit"):
            return
        if text.strip() == "/reset":
            messages = list(start)
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        try:
            answer = reply(c, {"model": model, "messages": messages, **options})
            messages.append({"role": "assistant", "content": answer})
        except ClientError as exc:
            messages.pop()
            print(f"error: {exc}", file=sys.stderr)
        except KeyboardInterrupt:
            messages.pop()
            print(" [stopped]")
        print()
