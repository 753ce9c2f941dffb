"""What the commands print: Rich for people, `--json` for scripts (the API's JSON and nothing else on stdout)."""

from __future__ import annotations

import json
import sys
import time
from typing import NoReturn

import typer
from rich import box
from rich.console import Console
from rich.table import Table

console = Console(width=None if sys.stdout.isatty() else 250)  # piped output: no truncated tables
errors = Console(stderr=True, soft_wrap=True)  # an error is one line, whatever the width

FINISHED = {"succeeded", "failed", "cancelled"}
JSON_OPTION = typer.Option(False, "--json", help="Print the API's JSON, nothing else (for scripts, e.g. jq)")


def fail(message: str) -> NoReturn:
    """The error on stderr (stdout stays clean for `--json` and pipes), exit status 1."""
    errors.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


def print_json(data) -> None:
    """`data` as JSON on stdout: a list as an array, an object as it is."""
    print(json.dumps(data, indent=1, ensure_ascii=False), flush=True)


def print_table(columns: tuple[str, ...], rows: list[tuple[str, ...]], ids: tuple[str, ...] = ("id",)) -> None:
    """A Rich table whose id columns are never wrapped, folded or cut, whatever the terminal's width: an id must
    be whole on one line to be copied into the next command. Other columns fold; a line wider than the terminal
    is left for the terminal to wrap rather than cut."""
    t = Table(
        box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True
    )  # no vertical rules: the width goes to the text
    for i, name in enumerate(columns):
        if name in ids:
            width = max([len(name), *(len(r[i]) for r in rows)])
            t.add_column(name, no_wrap=True, min_width=width, overflow="ignore")
        else:
            t.add_column(name, overflow="fold")
    for r in rows:
        t.add_row(*r)
    console.print(t, crop=False)


def wait_with_progress(c, job_id: str) -> dict:
    """A live bar with step/total, loss, reward accuracy and time left, until the job finishes; the job then."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [
        TextColumn("[bold]{task.fields[status]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("job", total=None, status="queued", loss="-", acc="-")
        while True:
            job = c.job(job_id)
            m = job["metrics"]
            acc = m.get("rewards/accuracies", m.get("mean_token_accuracy"))
            bar.update(
                task,
                total=job["total_steps"],
                completed=job["step"],
                status=job["status"],
                loss=f"{m['loss']:.4f}" if m.get("loss") is not None else "-",
                acc=f"{acc:.2f}" if acc is not None else "-",
            )
            if job["status"] in FINISHED:
                return job
            time.sleep(1.0)
