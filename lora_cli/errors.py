"""Expected failures carry a one-line message, a hint and an exit code.

Only the CLI prints them; everything below it raises. Anything that is not a
``LoraError`` is a bug and is allowed to show a traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class LoraError(Exception):
    """An expected failure: bad input, unsupported variant, I/O problem."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

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
