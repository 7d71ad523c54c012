"""The one output sink: tables and summaries on stdout, progress and errors on stderr.

JSON mode prints exactly one document on stdout and nothing else there, so a
CI job can pipe it into ``jq``; colour only when the stream is a terminal.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.table import Table

_out = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False, soft_wrap=True)


def out() -> Console:
    return _out


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


def error(message: str, hint: str | None = None) -> None:
    """One line: what failed (file, tensor) and what to do about it."""
    text = f"{message} — {hint}" if hint else message
    _err.print(f"[bold red]error:[/] {_escape(text)}", overflow="ignore", crop=False)


def warn(message: str) -> None:
    _err.print(f"[yellow]warning:[/] {_escape(message)}")


def info(message: str) -> None:
    _err.print(_escape(message))


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    t = Table(title=title, title_justify="left", show_lines=False)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[_escape(str(x)) for x in r])
    _out.print(t)


def key_values(title: str, pairs: list[tuple[str, Any]]) -> None:
    t = Table(title=title, title_justify="left", show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in pairs:
        t.add_row(k, _escape(str(v)))
    _out.print(t)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


@contextlib.contextmanager
def progress_bar(
    description: str, enabled: bool
) -> Iterator[Callable[[int], Callable[[int, str], None]] | None]:
    """Yields a factory ``(total_bytes) -> callback(nbytes, tensor_name)``, or None when quiet.

    Shown only on a terminal: CI logs get the final summary, not a stream of redraws.
    """
    if not enabled or not _err.is_terminal:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TextColumn("{task.fields[tensors]} tensors"),
        TimeRemainingColumn(),
        console=_err,
        transient=True,
    )
    # the live display starts with the first task, so that what runs before it (the Hub's
    # own download bars) draws undisturbed
    started = False

    def factory(total: int) -> Callable[[int, str], None]:
        nonlocal started
        if not started:
            bar.start()
            started = True
        task = bar.add_task(description, total=total, tensors=0)
        count, last = 0, None

        def update(nbytes: int, name: str) -> None:
            nonlocal count, last
            count += name != last  # a big tensor arrives in several row blocks
            last = name
            bar.update(task, advance=nbytes, tensors=count)

        return update

    try:
        yield factory
    finally:
        if started:
            bar.stop()
