"""How ``--help`` reads: click's usage line (``lora merge [OPTIONS] BASE [ADAPTER...]``),
no type labels beside flags and arguments, examples at the end, as the ``hf`` CLI shows them.
Also where click's own parse errors meet ``--json``.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperCommand, TyperGroup


def without_type_labels(params: list[Any]) -> list[Any]:
    """No type column where typer would print ``<bool>`` for a flag or ``<path>`` beside an
    argument whose name already says what it is (options show their metavar)."""
    for param in params:
        if param.param_type_name == "argument" or getattr(param, "is_flag", False):
            param.display_type_rich = lambda ctx: None  # type: ignore[attr-defined]
    return params


class _ParseFailures:
    """A command line click cannot parse is a failure too (``fail_as_json``): ``lora --bogus
    --json`` (the group's options), ``lora inspect --bogus --json`` (a command's)."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: Any | None = None,
        **extra: Any,
    ) -> Any:
        json_out = "--json" in args  # before click's parser consumes ``args``
        hint = f"see lora {info_name} --help" if parent is not None else "see lora --help"
        try:
            return super().make_context(info_name, args, parent, **extra)  # type: ignore[misc]
        except Exception as exc:  # click's UsageError (typer vendors its own click)
            fail_as_json(exc, json_out, hint)
            raise


class Command(_ParseFailures, TyperCommand):
    """Help as click (and ``hf``) writes it: ``lora merge [OPTIONS] BASE [ADAPTER...]``."""

    def get_params(self, ctx: Any) -> list[Any]:
        return without_type_labels(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar or (param.name or "").upper()
                pieces.append(name if param.required else f"[{name}]")
        return pieces


class Group(_ParseFailures, TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return without_type_labels(super().get_params(ctx))

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        """``lora bogus --json``: no such command (``fail_as_json``)."""
        json_out = "--json" in args
        try:
            return super().resolve_command(ctx, args)
        except Exception as exc:
            fail_as_json(exc, json_out, "see lora --help")
            raise


def fail_as_json(exc: Exception, json_out: bool, hint: str) -> None:
    """With ``--json`` on the command line, a command line click cannot parse fails like every
    other ``--json`` failure: one ``error:`` line on stderr (not click's usage box), one
    ``lora-error/1`` document on stdout, exit 2. Without ``--json`` click reports it as usual."""
    if not json_out or not hasattr(exc, "format_message"):
        return
    import typer

    from lora_cli import output

    code = getattr(exc, "exit_code", 2)
    output.error(exc.format_message(), hint)
    output.error_json(exc.format_message(), hint, code)
    raise typer.Exit(code) from None


def examples(*lines: str) -> str:
    """An epilog of example command lines for --help, one per line."""
    return "[bold]Examples[/]\n\n" + "\n\n".join(f"  $ {ln}" for ln in lines)
