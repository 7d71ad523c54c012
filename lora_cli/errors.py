"""Expected failures carry a one-line message, a hint and an exit code.

Only the CLI prints them; everything below it raises. Anything that is not a
``LoraError`` is a bug: the CLI prints its traceback with a "please report" line and exits
``EXIT_BUG``, never 1 (``validate``'s findings code, which a CI job may treat as "the model
is bad" rather than "the tool broke").
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_ERROR = 2
EXIT_BUG = 70  # sysexits.h EX_SOFTWARE: an internal error, not a verdict on the input

# ``tensor 'name': …`` or ``tensor 'name' has …``: the name as repr() wrote it
_TENSOR_PREFIX = re.compile(r"^tensor ('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")(?::? |$)")


class LoraError(Exception):
    """An expected failure: bad input, unsupported variant, I/O problem."""

    exit_code = EXIT_ERROR

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        file: str | Path | None = None,
        tensor: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.file = None if file is None else str(file)
        self.tensor = tensor

    def location(self) -> tuple[str | None, str | None]:
        """(file, tensor) the error is about: as raised, else read back from the message's
        ``<file>: tensor '<name>': …`` form (most raises predate the structured fields)."""
        file, tensor = self.file, self.tensor
        rest = self.message
        if file is None:
            head, sep, tail = rest.partition(": ")
            if sep and _looks_like_path(head):
                file, rest = head, tail
        elif rest.startswith(f"{file}: "):
            rest = rest[len(file) + 2 :]
        if tensor is None:
            m = _TENSOR_PREFIX.match(rest)
            if m:
                try:
                    tensor = str(ast.literal_eval(m.group(1)))
                except (ValueError, SyntaxError):
                    tensor = None
        return file, tensor

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class FormatError(LoraError):
    """A file does not follow its format's rules (safetensors header, torch zip...)."""


class UnsafePickleError(FormatError):
    """A pickle asked for a global outside the state-dict allowlist."""


class MergeError(LoraError):
    """The adapter cannot be merged into this base correctly."""


class UsageError(LoraError):
    """Options or paths that make no sense together."""


class HubError(LoraError):
    """A Hugging Face Hub id that could not be resolved (missing, gated, offline, network)."""


def _looks_like_path(text: str) -> bool:
    """A message's first field names a file when it is one, or is spelled like one."""
    if not text or len(text) > 4096 or "\n" in text:
        return False
    try:
        if Path(text).exists():
            return True
    except (OSError, ValueError):
        return False
    spelled = "/" in text or "\\" in text or bool(Path(text).suffix)
    return spelled and " " not in text
