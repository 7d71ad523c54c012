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


class Command(TyperCommand):
    """Help as click (and ``hf``) writes it: ``lora merge [OPTIONS] BASE [ADAPTER...]``."""

    def get_params(self, ctx: Any) -> list[Any]:
        return without_type_labels(super().get_params(ctx))

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: Any | None = None,
        **extra: Any,
    ) -> Any:
        """A command line click cannot parse is a failure too: with ``--json`` it gets its
        ``lora-error/1`` document (click prints the usage line on stderr)."""
        json_out = "--json" in args
        try:
            return super().make_context(info_name, args, parent, **extra)
        except Exception as exc:  # click's UsageError (typer vendors its own click)
            if json_out and hasattr(exc, "format_message"):
                from lora_cli import output

                hint = f"see lora {info_name} --help"
                output.error_json(exc.format_message(), hint, getattr(exc, "exit_code", 2))
            raise

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar or (param.name or "").upper()
                pieces.append(name if param.required else f"[{name}]")
        return pieces


class Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return without_type_labels(super().get_params(ctx))


def examples(*lines: str) -> str:
    """An epilog of example command lines for --help, one per line."""
    return "[bold]Examples[/]\n\n" + "\n\n".join(f"  $ {ln}" for ln in lines)
