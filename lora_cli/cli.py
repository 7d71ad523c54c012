"""Command line: parse options, call a stage, render its result. Nothing else lives here.

Stages (and torch) are imported inside each command so ``lora --help`` stays fast, and
argument mistakes (``lora_cli.args``) are answered before they are imported.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import typer

from lora_cli import __version__
from lora_cli.help_format import Command, Group, examples

app = typer.Typer(
    name="lora",
    cls=Group,
    help="Inspect, convert, merge and validate LoRA adapters, one tensor at a time.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion, as `hf` has
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

JSON_HELP = "Print one JSON document on stdout instead of tables (on failure: lora-error/1)."
QUIET_HELP = "No progress bar and no summary (errors still go to stderr)."
SHARD_HELP = "Largest output shard, e.g. 500MB, 5GB, 2GiB."
# option groups in --help, as `hf` shows them
OUTPUT_PANEL = "Output"
SEVERAL_PANEL = "Several adapters"
CKPT_PANEL = "Training checkpoint (CKPT)"
SPLIT_PANEL = "Split across jobs"
RECOMPUTE_PANEL = "Recompute (with --base and --adapter)"
EXTRACTED_PANEL = "Extracted adapter (with --base and --tuned)"
_json_mode = False  # whether the running command prints JSON, for its failure report too


@contextlib.contextmanager
def _expected_failures(json_out: bool = False) -> Iterator[None]:
    """Turn expected failures into one line on stderr and an exit code; never a traceback.

    With ``--json`` the failure is also one ``lora-error/1`` document on stdout, so a job
    that reads stdout gets a document whatever happened."""
    global _json_mode
    from lora_cli import errors

    _json_mode = json_out
    try:
        yield
    except errors.LoraError as exc:
        _report(exc.message, exc.hint, exc.exit_code, *exc.location())
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (lora_cli/interrupts.py)
        from lora_cli import interrupts

        _report(interrupts.message(), None, interrupts.exit_code())
        raise typer.Exit(interrupts.exit_code()) from None


def _report(
    message: str, hint: str | None, code: int, file: str | None = None, tensor: str | None = None
) -> None:
    from lora_cli import output

    output.error(message, hint)
    if _json_mode:
        output.error_json(message, hint, code, file, tensor)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Inspect, convert, merge and validate LoRA adapters, one tensor at a time."""


@app.command(
    cls=Command,
    epilog=examples(
        "lora inspect ./my-adapter",
        "lora inspect ./Llama-3-8B --json",
        "lora inspect ./checkpoint-500",
        "lora inspect my-org/my-adapter@v1.0",
    ),
)
def inspect(
    path: Path = typer.Argument(
        ...,
        metavar="PATH",
        show_default=False,
        help="Adapter folder, checkpoint folder, weights file or Hub id (org/name\\[@revision]).",
    ),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Show what an adapter, checkpoint or weights file holds (headers only, no tensor data)."""
    with _expected_failures(json_out):
        from lora_cli.args import check_inputs

        check_inputs([("PATH", path)])
        from lora_cli import output, render
        from lora_cli.stages.inspect import inspect_path

        report = inspect_path(path, notice=output.info, hub_progress=not json_out)
        render.inspect_report(report, json_out)


@app.command(
    cls=Command,
    epilog=examples(
        "lora convert ./my-adapter",
        "lora convert ./old-model -o out --dtype bf16 --max-shard-size 2GB",
        "lora convert ./ds_ckpt -o ./model",
        "lora convert ./peft-adapter --to gguf --base ./Llama-3.2-1B -o adapter.gguf",
    ),
)
def convert(
    input_path: Path = typer.Argument(
        ...,
        metavar="INPUT",
        show_default=False,
        help="Adapter or checkpoint: a path or a Hub id (org/name\\[@rev]).",
    ),
    output_path: Path | None = typer.Option(
        None,
        "-o",
        "--output",
        metavar="PATH",
        help="Output path (default: beside the input).",
        rich_help_panel=OUTPUT_PANEL,
    ),
    dtype: str = typer.Option(
        "keep",
        metavar="DTYPE",
        help="keep, fp32, fp16 or bf16 (checkpoints only).",
        rich_help_panel=OUTPUT_PANEL,
    ),
    max_shard_size: str = typer.Option(
        "5GB", metavar="SIZE", help=SHARD_HELP, rich_help_panel=OUTPUT_PANEL
    ),
    targets_as_list: bool = typer.Option(
        False, "--targets-as-list", help="Rewrite a regex target_modules as the module list."
    ),
    to: str | None = typer.Option(
        None,
        "--to",
        metavar="FORMAT",
        help="Write the adapter as peft, mlx (mlx-lm) or gguf (llama.cpp LoRA).",
    ),
    base: Path | None = typer.Option(
        None,
        "--base",
        metavar="BASE",
        help="Base model folder or Hub id (needed by --to gguf; names for --to mlx).",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing output.", rich_help_panel=OUTPUT_PANEL
    ),
    adapter_config: Path | None = typer.Option(
        None,
        "--adapter-config",
        metavar="PATH",
        help="The adapter_config.json giving lora_alpha.",
        rich_help_panel=CKPT_PANEL,
    ),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP, rich_help_panel=OUTPUT_PANEL),
    quiet: bool = typer.Option(
        False, "-q", "--quiet", help=QUIET_HELP, rich_help_panel=OUTPUT_PANEL
    ),
) -> None:
    """Safetensors from .bin/.pt (no pickle code runs), checkpoints, or other formats.

    Turns .bin/.pt weights into deduplicated safetensors without running pickle code;
    consolidates DeepSpeed/FSDP checkpoints and PeftModel state dicts; or writes an adapter
    in another ecosystem's format (--to peft | mlx | gguf)."""
    with _expected_failures(json_out):
        from lora_cli.args import check_inputs

        check_inputs([("INPUT", input_path), ("--base", base)])
        from lora_cli import output, render
        from lora_cli.stages.convert import convert as run_convert

        with output.progress_bar("converting", not quiet and not json_out) as factory:
            result = run_convert(
                input_path,
                output_path,
                dtype=dtype,
                max_shard_size=max_shard_size,
                targets_as_list=targets_as_list,
                overwrite=overwrite,
                progress_factory=factory,
                to=to,
                base=base,
                adapter_config=adapter_config,
                notice=None if quiet else output.info,
                hub_progress=not quiet and not json_out,
            )
        render.convert_result(result, json_out, quiet)


@app.command(
    cls=Command,
    epilog=examples(
        "lora merge ./Llama-3-8B ./my-adapter -o ./merged",
        "lora merge ./Llama-3-8B ./my-adapter --dry-run",
        "lora merge my-org/my-adapter -o ./merged",
        "lora merge ./Llama-3-8B ./style ./domain -o ./merged --weights 0.7,0.3",
        "lora merge ./checkpoint-500 -o ./merged --base ./Llama-3-8B",
        "lora merge ./base ./adapter -o ./merged --part 1/4   (then --join)",
    ),
)
def merge(
    base: Path = typer.Argument(
        ...,
        metavar="BASE",
        show_default=False,
        help="Base checkpoint: folder, index, weights file or Hub id (org/name\\[@revision]). "
        "Omitted: the adapter's base_model_name_or_path. Alone: a training checkpoint "
        "(PeftModel state dict, DeepSpeed ZeRO, FSDP or HF Trainer folder) to merge.",
    ),
    adapter: list[Path] | None = typer.Argument(
        None,
        metavar="ADAPTER...",
        show_default=False,
        help="Adapter folder, adapter weights file or Hub id; several merge their weighted sum.",
    ),
    output_path: Path | None = typer.Option(
        None,
        "-o",
        "--output",
        metavar="OUT",
        help="Output folder (must not exist unless --overwrite).",
        rich_help_panel=OUTPUT_PANEL,
    ),
    ckpt_base: Path | None = typer.Option(
        None,
        "--base",
        metavar="BASE",
        help="Base model for the frozen weights, config and tokenizer.",
        rich_help_panel=CKPT_PANEL,
    ),
    adapter_config: Path | None = typer.Option(
        None,
        "--adapter-config",
        metavar="PATH",
        help="The adapter_config.json giving lora_alpha (must agree with the folder's own).",
        rich_help_panel=CKPT_PANEL,
    ),
    weights: str | None = typer.Option(
        None,
        metavar="W1,W2,…",
        help="One weight per adapter, comma-separated, e.g. 0.7,0.3 (default 1 each).",
        rich_help_panel=SEVERAL_PANEL,
    ),
    dtype: str = typer.Option(
        "keep",
        metavar="DTYPE",
        help="Output dtype: keep, fp32, fp16 or bf16.",
        rich_help_panel=OUTPUT_PANEL,
    ),
    max_shard_size: str | None = typer.Option(
        None,
        metavar="SIZE",
        help=SHARD_HELP + " Default: the base's own shard files.",
        rich_help_panel=OUTPUT_PANEL,
    ),
    device: str = typer.Option("auto", metavar="DEVICE", help="auto, cpu or cuda[:N]."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, write nothing."),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace an existing output folder.",
        rich_help_panel=OUTPUT_PANEL,
    ),
    part: str | None = typer.Option(
        None,
        "--part",
        metavar="I/N",
        help="Write only part I of N (into OUT.lora-parts/).",
        rich_help_panel=SPLIT_PANEL,
    ),
    join: bool = typer.Option(
        False,
        "--join",
        help="Check the parts written with --part and publish OUT.",
        rich_help_panel=SPLIT_PANEL,
    ),
    checksums: bool = typer.Option(
        True,
        "--checksums/--no-checksums",
        help="Write lora-checksums.sha256 (sha256 per file).",
        rich_help_panel=OUTPUT_PANEL,
    ),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP, rich_help_panel=OUTPUT_PANEL),
    quiet: bool = typer.Option(
        False, "-q", "--quiet", help=QUIET_HELP, rich_help_panel=OUTPUT_PANEL
    ),
    quantize: str = typer.Option(
        "bf16",
        metavar="bf16|keep",
        help="Quantized base (FP8, compressed-tensors, MXFP4): write merged weights as bf16, "
        "or 'keep' to re-quantize them in the base's format.",
    ),
    evict: bool = typer.Option(
        False,
        "--evict",
        help="Delete each base shard fetched from the Hub once read, and each output shard "
        "once pushed: the disk holds about one of each.",
    ),
    push_to_hub: str | None = typer.Option(
        None,
        "--push-to-hub",
        metavar="REPO",
        help="Upload each output shard as it is written; one commit at the end (or at --join).",
    ),
    revision: str | None = typer.Option(
        None, "--revision", metavar="BRANCH", help="--push-to-hub: the branch to commit to."
    ),
    private: bool = typer.Option(False, "--private", help="--push-to-hub: create it private."),
    create_pr: bool = typer.Option(
        False, "--create-pr", help="--push-to-hub: open a pull request instead of committing."
    ),
) -> None:
    """Fold LoRA adapters into the base weights, streaming tensor by tensor.

    [bold]lora merge BASE ADAPTER… -o OUT[/] merges adapters into a base;
    [bold]lora merge ADAPTER -o OUT[/] takes the base from the adapter's config;
    [bold]lora merge CKPT -o OUT [--base BASE][/] merges a training checkpoint (PeftModel state
    dict, DeepSpeed ZeRO or FSDP folder, HF Trainer checkpoint-N/)."""
    with _expected_failures(json_out):
        from lora_cli.args import check_device, check_inputs, parse_weights

        check_inputs([("BASE", base), *(("ADAPTER", a) for a in adapter or ()),
                      ("--base", ckpt_base), ("--adapter-config", adapter_config)])  # fmt: skip
        check_device(device)
        if weights is not None:
            parse_weights(weights, len(adapter or ()) or 1)
        from lora_cli import output, render

        if not adapter and _is_training_checkpoint(base):  # `lora merge CKPT -o OUT`
            if part or join or weights or quantize != "bf16" or not checksums or push_to_hub:
                from lora_cli.errors import UsageError

                raise UsageError(
                    "--part, --join, --weights, --quantize, --no-checksums and --push-to-hub do "
                    "not apply to a training checkpoint",
                    "lora merge CKPT -o OUT [--base BASE] [--dtype …]",
                )
            from lora_cli.stages.merge import merge_checkpoint

            with output.progress_bar("merging", not quiet and not json_out) as factory:
                result = merge_checkpoint(
                    base,
                    output_path,
                    base=ckpt_base,
                    adapter_config=adapter_config,
                    dtype=dtype,
                    max_shard_size=max_shard_size,
                    device=device,
                    dry_run=dry_run,
                    overwrite=overwrite,
                    progress_factory=factory,
                )
            render.merge_result(result, json_out, quiet)
            return
        from lora_cli.stages.merge import merge as run_merge
        from lora_cli.stages.merge import trainer_adapter_folder

        if ckpt_base is not None or adapter_config is not None:
            # an HF Trainer checkpoint-N/ without DeepSpeed or FSDP is an adapter folder
            folder = trainer_adapter_folder(base, adapter, adapter_config)
            base, adapter = ckpt_base, [folder]
        elif not adapter:  # `lora merge ADAPTER -o OUT`: the base comes from adapter_config.json
            base, adapter = None, [base]
        with output.progress_bar("merging", not quiet and not json_out) as factory:
            result = run_merge(
                base,
                adapter,
                output_path,
                weights=weights,
                dtype=dtype,
                max_shard_size=max_shard_size,
                device=device,
                dry_run=dry_run,
                overwrite=overwrite,
                progress_factory=factory,
                quantize=quantize,
                part=part,
                join=join,
                checksums=checksums,
                notice=None if quiet else output.info,
                hub_progress=not quiet and not json_out,
                evict=evict,
                push_to_hub=push_to_hub,
                revision=revision,
                private=private,
                create_pr=create_pr,
            )
        render.merge_result(result, json_out, quiet)


def _is_training_checkpoint(path: Path) -> bool:
    from lora_cli.sources.checkpoint_detect import is_training_checkpoint

    return Path(path).exists() and is_training_checkpoint(Path(path))


@app.command(
    cls=Command,
    epilog=examples(
        "lora validate ./merged",
        "lora validate ./merged --base ./Llama-3-8B --adapter ./my-adapter",
        "lora validate ./merged --base ./base --adapter ./adapter --sample 64 --json",
        "lora validate ./my-adapter --base ./Llama-3-8B",
    ),
)
def validate(
    path: Path = typer.Argument(
        ...,
        metavar="PATH",
        show_default=False,
        help="Checkpoint, adapter, weights file or Hub id to check.",
    ),
    base: Path | None = typer.Option(
        None,
        metavar="BASE",
        help="Base checkpoint (or Hub id) PATH was merged from (with --adapter).",
    ),
    adapter: list[Path] | None = typer.Option(
        None,
        metavar="ADAPTER",
        help="Adapter (or Hub id) PATH was merged with (with --base); repeat for several.",
    ),
    weights: str | None = typer.Option(
        None,
        metavar="W1,W2,…",
        help="The --weights PATH was merged with, e.g. 0.7,0.3 (several adapters).",
        rich_help_panel=RECOMPUTE_PANEL,
    ),
    atol: float = typer.Option(
        0.0,
        metavar="FLOAT",
        help="Extra absolute tolerance for recomputed tensors.",
        rich_help_panel=RECOMPUTE_PANEL,
    ),
    rtol: float = typer.Option(
        0.0,
        metavar="FLOAT",
        help="Extra relative tolerance for recomputed tensors.",
        rich_help_panel=RECOMPUTE_PANEL,
    ),
    sample: int | None = typer.Option(
        None,
        metavar="N",
        help="Recompute only N untouched tensors (plus every adapter-touched one).",
        rich_help_panel=RECOMPUTE_PANEL,
    ),
    device: str = typer.Option(
        "auto",
        metavar="DEVICE",
        help="auto, cpu or cuda[:N] for recomputation.",
        rich_help_panel=RECOMPUTE_PANEL,
    ),
    part: str | None = typer.Option(
        None,
        "--part",
        metavar="I/N",
        help="Read only part I of N of the weight files.",
        rich_help_panel=SPLIT_PANEL,
    ),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
    tuned: Path | None = typer.Option(
        None,
        metavar="TUNED",
        help="With --base: the fine-tune PATH (an adapter) was extracted from.",
        rich_help_panel=EXTRACTED_PANEL,
    ),
    max_error: float | None = typer.Option(
        None,
        metavar="FRACTION",
        help="With --tuned: relative error above which a tensor is a finding.",
        rich_help_panel=EXTRACTED_PANEL,
    ),
) -> None:
    """Check integrity and numbers; exit 0 valid, 1 findings, 2 could not run."""
    if tuned is not None or max_error is not None:
        recompute = adapter or weights or sample is not None or part or atol or rtol
        _validate_extracted(path, base, tuned, max_error, device, json_out, bool(recompute))
    with _expected_failures(json_out):
        from lora_cli.args import check_device, check_inputs, parse_weights

        check_inputs([("PATH", path), ("--base", base), *(("--adapter", a) for a in adapter or ())])
        check_device(device)
        if weights is not None and adapter:
            parse_weights(weights, len(adapter))
        from lora_cli import output, render
        from lora_cli.stages.validate import validate as run_validate

        with output.progress_bar("validating", not json_out) as factory:
            report = run_validate(
                path,
                base=base,
                adapter=adapter or None,
                weights=weights,
                atol=atol,
                rtol=rtol,
                sample=sample,
                device=device,
                part=part,
                notice=output.info,
                hub_progress=not json_out,
                progress_factory=factory,
            )
        code = render.validate_report(report, json_out)
        raise typer.Exit(code)


@app.command(
    cls=Command,
    epilog=examples(
        "lora extract ./Llama-3-8B ./my-full-finetune -o ./my-lora --rank 64",
        "lora extract ./base ./tuned -o ./small --rank auto --energy 0.99 --max-rank 256",
        "lora extract ./base ./tuned --dry-run",
        "lora validate ./my-lora --base ./base --tuned ./tuned --max-error 0.2",
    ),
)
def extract(
    base: Path = typer.Argument(
        ...,
        metavar="BASE",
        show_default=False,
        help="Base checkpoint: folder, index, weights file or Hub id (org/name[@revision]).",
    ),
    tuned: Path = typer.Argument(
        ...,
        metavar="TUNED",
        show_default=False,
        help="The full fine-tune of BASE: folder, weights file or Hub id.",
    ),
    output_path: Path | None = typer.Option(
        None,
        "-o",
        "--output",
        metavar="OUT",
        help="Adapter folder to write (must not exist unless --overwrite).",
        rich_help_panel=OUTPUT_PANEL,
    ),
    rank: str = typer.Option(
        "32", metavar="R|auto", help="LoRA rank per module, or 'auto' (see --energy)."
    ),
    energy: float = typer.Option(
        0.99, metavar="FRACTION", help="--rank auto: share of each change's ‖Δ‖² to keep."
    ),
    max_rank: int = typer.Option(
        128, metavar="R", help="--rank auto: the largest rank a module may get."
    ),
    exact: bool = typer.Option(
        False, "--exact", help="Full SVD instead of randomized (slower; optimal error)."
    ),
    dtype: str = typer.Option(
        "bf16", metavar="bf16|fp16|fp32", help="Factor dtype.", rich_help_panel=OUTPUT_PANEL
    ),
    min_change: float = typer.Option(
        0.0, metavar="EPS", help="Skip tensors whose ‖Δ‖ is at most this fraction of ‖BASE‖."
    ),
    include_full: bool | None = typer.Option(
        None,
        "--include-full/--no-include-full",
        show_default=False,
        help="Ship changed non-LoRA tensors (norms, biases) whole [default: on]; given "
        "explicitly, also a grown embedding/head.",
    ),
    device: str = typer.Option(
        "auto", metavar="DEVICE", help="auto, cpu or cuda[:N] for the SVDs."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the targets, write nothing."),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace an existing output folder.",
        rich_help_panel=OUTPUT_PANEL,
    ),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
    quiet: bool = typer.Option(False, "-q", "--quiet", help=QUIET_HELP),
) -> None:
    """Turn a full fine-tune into a PEFT LoRA adapter of its base (truncated SVD of each
    weight's change), streaming one tensor pair at a time."""
    with _expected_failures(json_out):
        from lora_cli import output
        from lora_cli.render_extract import extract_result
        from lora_cli.stages.extract import extract as run_extract

        with output.progress_bar("extracting", not quiet and not json_out) as factory:
            result = run_extract(
                base,
                tuned,
                output_path,
                rank=rank,
                energy=energy,
                max_rank=max_rank,
                exact=exact,
                dtype=dtype,
                min_change=min_change,
                include_full=include_full,
                device=device,
                dry_run=dry_run,
                overwrite=overwrite,
                progress_factory=factory,
                notice=None if quiet else output.info,
                hub_progress=not quiet and not json_out,
            )
        extract_result(result, json_out, quiet)


def _validate_extracted(
    path: Path,
    base: Path | None,
    tuned: Path | None,
    max_error: float | None,
    device: str,
    json_out: bool,
    recompute_options: bool,
) -> None:
    """``lora validate OUT --base BASE --tuned TUNED``: exits with 0, 1 (findings) or 2."""
    with _expected_failures(json_out):
        from lora_cli import output
        from lora_cli.errors import UsageError
        from lora_cli.render_extract import extract_validation
        from lora_cli.stages.validate_extracted import validate_extracted

        usage = "lora validate ADAPTER --base BASE --tuned TUNED [--max-error X]"
        if base is None or tuned is None:
            raise UsageError("--tuned and --max-error need both --base and --tuned", usage)
        if recompute_options:
            raise UsageError(
                "--tuned goes without --adapter, --weights, --sample, --part, --atol, --rtol",
                usage,
            )
        report = validate_extracted(
            path,
            base=base,
            tuned=tuned,
            max_error=max_error,
            device=device,
            notice=output.info,
            hub_progress=not json_out,
        )
        code = extract_validation(report, json_out)
    raise typer.Exit(code)


def _bug(exc: BaseException) -> int:
    """An exception no stage expected is a bug in lora: its traceback and a line that says
    so, exit ``EXIT_BUG`` (never 1, which ``validate`` uses for "the checkpoint is bad")."""
    import traceback

    from lora_cli.errors import EXIT_BUG
    from lora_cli.output import clean

    # indented and escaped: an exception's message may quote a name from a file, and must
    # not forge an ``error:`` line of its own
    for line in "".join(traceback.format_exception(exc)).splitlines():
        sys.stderr.write(f"  {clean(line)}\n")
    message = f"internal error: {type(exc).__name__}: {exc} (this is a bug in lora {__version__})"
    _report(message, "please report it with the traceback above", EXIT_BUG)
    return EXIT_BUG


def _tolerant_streams() -> None:
    """A stream that cannot encode a character (``PYTHONIOENCODING=ascii``, a C locale)
    writes it as an escape instead of crashing after the work is done."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            if stream.errors == "strict":
                stream.reconfigure(errors="backslashreplace")


def main() -> None:
    # OpenMP workers that spin between torch's many small ops burn a core for nothing in a
    # streaming merge (profiled: ~10% of its CPU); sleeping ones cost nothing. Before torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _tolerant_streams()
    from lora_cli import interrupts

    interrupts.install()
    try:
        with interrupts.exit_promptly_when_interrupted():
            app()
    except BrokenPipeError:  # `lora inspect --json x | head`
        sys.stderr.close()
        sys.exit(0)
    except Exception as exc:  # typer.Exit and click's usage errors are SystemExit, not here
        sys.exit(_bug(exc))
