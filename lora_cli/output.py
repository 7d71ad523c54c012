"""The one output sink: tables and summaries on stdout, progress and errors on stderr.

JSON mode prints exactly one document on stdout and nothing else there, so a
CI job can pipe it into ``jq``; colour only when the stream is a terminal.

Every line of text passes through ``clean``: names come from files written by strangers
(tensor names, GGUF stems, DCP paths), and a newline or an ANSI sequence in one would forge
an ``error:`` or ``FINDING`` line or repaint the terminal. Control characters are written
as Python's ``repr`` writes them (``\\n``, ``\\x1b``, ``\\u2028``); JSON keeps the exact text.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

# C0 and C1 controls, DEL, the Unicode line and paragraph separators (str.splitlines
# breaks on them) and the bidirectional overrides that reorder what a terminal shows.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# A pipe or a log file has no width: Rich's default of 80 columns would cut tensor names.
_UNBOUNDED_WIDTH = 100_000
_consoles: dict[tuple[int, bool], tuple[TextIO, Console]] = {}


def clean(text: object) -> str:
    """``text`` on one line, its control characters escaped (``'a\\nb'`` → ``a\\nb``)."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(text))


def plural(n: int, noun: str, many: str | None = None) -> str:
    """``1 tensor``, ``2 tensors``: a count with its noun agreeing."""
    return f"{n} {noun if n == 1 else many or noun + 's'}"


def _console(stderr: bool) -> Console:
    """A console for the current ``sys.stdout``/``sys.stderr`` (tests and pipes swap them)."""
    stream = sys.stderr if stderr else sys.stdout
    key = (id(stream), stderr)
    cached = _consoles.get(key)
    if cached is not None and cached[0] is stream:
        return cached[1]
    width = None if _isatty(stream) else _UNBOUNDED_WIDTH
    console = Console(file=stream, highlight=False, soft_wrap=True, width=width)
    _consoles[key] = (stream, console)
    return console


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def out() -> Console:
    return _console(stderr=False)


def line(text: object) -> None:
    """One plain line on stdout: no markup, no wrapping, control characters escaped."""
    out().print(clean(text), markup=False, overflow="ignore", crop=False)


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


def error_line(message: str, hint: str | None = None) -> str:
    """The text after ``error:``: what failed (file, tensor) and what to do about it."""
    return clean(f"{message} — {hint}" if hint else message)


def error(message: str, hint: str | None = None) -> None:
    """One line on stderr: what failed (file, tensor) and what to do about it."""
    _console(stderr=True).print(
        f"[bold red]error:[/] {_escape(error_line(message, hint))}", overflow="ignore", crop=False
    )


def error_json(
    message: str,
    hint: str | None,
    exit_code: int,
    file: str | None = None,
    tensor: str | None = None,
) -> None:
    """The failure as one ``lora-error/1`` document on stdout (``--json``): the same words
    as the stderr line, in fields a CI job can read without parsing the line."""
    print_json(
        {
            "schema": "lora-error/1",
            "error": message,
            "file": file,
            "tensor": tensor,
            "fix": hint,
            "exit_code": exit_code,
        }
    )


def warn(message: str) -> None:
    _console(stderr=True).print(
        f"[yellow]warning:[/] {_escape(clean(message))}", overflow="ignore", crop=False
    )


def info(message: str) -> None:
    _console(stderr=True).print(_escape(clean(message)), overflow="ignore", crop=False)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    t = Table(title=None if title is None else _escape(clean(title)), title_justify="left")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[_escape(clean(x)) for x in r])
    out().print(t)


def key_values(title: str, pairs: list[tuple[str, Any]]) -> None:
    t = Table(
        title=_escape(clean(title)),
        title_justify="left",
        show_header=False,
        box=None,
        pad_edge=False,
    )
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for k, v in pairs:
        t.add_row(_escape(clean(k)), _escape(clean(v)))
    out().print(t)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def progress_wanted(enabled: bool) -> bool:
    """Redraws only into a real terminal: ``FORCE_COLOR`` makes Rich treat a log file as
    one, and a log is no place for progress frames."""
    return enabled and _isatty(sys.stderr)


@contextlib.contextmanager
def progress_bar(
    description: str, enabled: bool, unit: str = "tensor"
) -> Iterator[Callable[[int], Callable[[int, str], None]] | None]:
    """Yields a factory ``(total_bytes) -> callback(nbytes, tensor_name)``, or None when quiet.

    Shown only on a terminal: CI logs get the final summary, not a stream of redraws.
    """
    if not progress_wanted(enabled):
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
        TextColumn("{task.fields[count]}"),
        TimeRemainingColumn(),
        console=_console(stderr=True),
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
        task = bar.add_task(description, total=total, count=plural(0, unit))
        count, last = 0, None

        def update(nbytes: int, name: str) -> None:
            nonlocal count, last
            count += name != last  # a big tensor arrives in several row blocks
            last = name
            bar.update(task, advance=nbytes, count=plural(count, unit))

        return update

    try:
        yield factory
    finally:
        if started:
            bar.stop()
