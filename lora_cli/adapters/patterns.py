"""PEFT's regex matching of module names, with the work bounded.

An ``adapter_config.json`` from a stranger carries regular expressions that PEFT runs
against module names: a string ``target_modules`` (``re.fullmatch``,
``check_target_module_exists``) and the keys of ``rank_pattern`` / ``alpha_pattern``
(``re.match(rf"(.*\\.)?({key})$", name)``, ``get_pattern_key``). Python's ``re`` is a
backtracking engine: ``(a|a)*c`` against a 40-character name takes 2⁴⁰ steps. We keep
PEFT's exact semantics (same module, same calls) and bound the work in three ways:

* a pattern longer than ``MAX_PATTERN_CHARS`` is refused before it is compiled;
* ``re.error`` is a one-line refusal naming the field;
* every match runs under a wall-clock budget (``MATCH_SECONDS`` for the whole command):
  ``re``'s matching loop checks for signals, so a ``SIGALRM`` timer interrupts a runaway
  match and the config is refused by name. A static "is this pattern safe" test was the
  alternative; it either refuses real configs (ms-swift's nested groups) or misses
  exponential ones, while a time budget is exact about what it bounds.

The timer needs the main thread (Python runs signal handlers only there); the CLI plans
there. Called from another thread the match runs without the timer (the length and
count caps still hold).
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from lora_cli.errors import FormatError

# ms-swift's generated multimodal target regexes, the longest real ones seen, are a few
# hundred characters; 4096 leaves an order of magnitude while bounding compile time.
MAX_PATTERN_CHARS = 4096
# Matching every module of a 100k-module model against a sane regex takes well under a
# second; 2 s of total matching per command leaves that margin on a loaded CI runner and
# still refuses an exponential pattern quickly.
MATCH_SECONDS = 2.0


class _Timeout(Exception):
    pass


def _on_alarm(signum: int, frame: object) -> None:
    raise _Timeout


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise ``_Timeout`` inside the block after ``seconds`` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if old_delay:  # someone else's timer was running: give it back
            signal.setitimer(signal.ITIMER_REAL, old_delay, old_interval)


class PatternBudget:
    """Compiled patterns and the time left for matching them, for one config file."""

    def __init__(self, config_path: Path, seconds: float = MATCH_SECONDS) -> None:
        self.config_path = config_path
        self.left = seconds
        self._compiled: dict[tuple[str, str], re.Pattern[str]] = {}

    def compile(self, field: str, pattern: str, template: str = "{}") -> re.Pattern[str]:
        """``template.format(pattern)`` compiled, or a refusal naming ``field``."""
        key = (field, template.format(pattern))
        rx = self._compiled.get(key)
        if rx is not None:
            return rx
        if len(pattern) > MAX_PATTERN_CHARS:
            raise FormatError(
                f"{self.config_path}: {field}: pattern of {len(pattern)} characters is longer "
                f"than {MAX_PATTERN_CHARS}",
                "list the module names instead of a regex",
            )
        try:
            rx = re.compile(key[1])
        except (re.error, RecursionError, OverflowError) as exc:
            raise FormatError(
                f"{self.config_path}: {field}: {pattern!r} is not a valid regular expression "
                f"({exc})",
                "fix the pattern (PEFT compiles it with Python's re)",
            ) from None
        self._compiled[key] = rx
        return rx

    def valid(self, field: str, pattern: str) -> bool:
        """Whether ``pattern`` compiles (a too-long one is still refused)."""
        try:
            self.compile(field, pattern)
        except FormatError:
            if len(pattern) > MAX_PATTERN_CHARS:
                raise
            return False
        return True

    def run(self, field: str, pattern: str, matches: Iterable[bool]) -> list[bool]:
        """Evaluate ``matches`` (a lazy sequence of re calls) inside the time budget."""
        start = time.monotonic()
        try:
            with _deadline(self.left):
                out = list(matches)
        except _Timeout:
            raise FormatError(
                f"{self.config_path}: {field}: matching {pattern!r} against the module names "
                f"ran past {MATCH_SECONDS:g} s (catastrophic backtracking)",
                "rewrite the pattern without nested repetition, or list the module names",
            ) from None
        finally:
            self.left -= time.monotonic() - start
        return out

    def fullmatch(self, field: str, pattern: str, names: list[str]) -> list[str]:
        """PEFT's string ``target_modules``: the names ``re.fullmatch`` selects."""
        rx = self.compile(field, pattern)
        hits = self.run(field, pattern, (rx.fullmatch(n) is not None for n in names))
        return [n for n, hit in zip(names, hits, strict=True) if hit]

    def suffix_key(self, field: str, keys: list[str], name: str) -> str | None:
        """PEFT's ``get_pattern_key``: the first key whose ``(.*\\.)?(key)$`` matches."""
        for key in keys:
            rx = self.compile(f"{field}[{key!r}]", key, r"(.*\.)?({})$")
            if self.run(f"{field}[{key!r}]", key, [rx.match(name) is not None])[0]:
                return key
        return None
