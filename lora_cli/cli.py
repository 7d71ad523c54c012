"""Command line: parse options, call a stage, render its result. Nothing else lives here.

Stages (and torch) are imported inside each command so ``lora --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import typer

from lora_cli import __version__

app = typer.Typer(
    name="lora",
    help="Inspect, convert, merge and validate LoRA adapters, one tensor at a time.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

JSON_HELP = "Print one JSON document on stdout instead of tables."
QUIET_HELP = "No progress bar and no summary (errors still go to stderr)."
SHARD_HELP = "Largest output shard, e.g. 500MB, 5GB, 2GiB."


@contextlib.contextmanager
def _expected_failures() -> Iterator[None]:
    """Turn expected failures into one line on stderr and an exit code; never a traceback."""
    from lora_cli import errors, output

    try:
        yield
    except errors.LoraError as exc:
        output.error(exc.message, exc.hint)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        output.error("interrupted; nothing was written to the destination")
        raise typer.Exit(errors.EXIT_INTERRUPTED) from None


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


@app.command()
def inspect(
    path: Path = typer.Argument(
        ...,
        metavar="PATH",
        help="Adapter folder, checkpoint folder, weights file or Hub id (org/name[@revision]).",
    ),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Show what an adapter, checkpoint or weights file holds (headers only, no tensor data)."""
    with _expected_failures():
        from lora_cli import output, render
        from lora_cli.stages.inspect import inspect_path

        report = inspect_path(path, notice=output.info, hub_progress=not json_out)
        render.inspect_report(report, json_out)


@app.command()
def convert(
    input_path: Path = typer.Argument(
        ..., metavar="INPUT", help="Adapter or checkpoint: a path or a Hub id (org/name[@rev])."
    ),
    output_path: Path | None = typer.Option(
        None, "-o", "--output", help="Output path (default: beside the input)."
    ),
    dtype: str = typer.Option("keep", help="keep, fp32, fp16 or bf16 (checkpoints only)."),
    max_shard_size: str = typer.Option("5GB", help=SHARD_HELP),
    targets_as_list: bool = typer.Option(
        False, "--targets-as-list", help="Rewrite a regex target_modules as the module list."
    ),
    to: str | None = typer.Option(
        None, "--to", help="Write the adapter as peft, mlx (mlx-lm) or gguf (llama.cpp LoRA)."
    ),
    base: Path | None = typer.Option(
        None,
        "--base",
        help="Base model folder or Hub id (needed by --to gguf; names for --to mlx).",
    ),
    overwrite: bool = typer.Option(False, help="Replace an existing output."),
    adapter_config: Path | None = typer.Option(
        None, help="Training checkpoint only: the adapter_config.json giving lora_alpha."
    ),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
    quiet: bool = typer.Option(False, "-q", "--quiet", help=QUIET_HELP),
) -> None:
    """Turn .bin/.pt weights into deduplicated safetensors without running pickle code;
    consolidate DeepSpeed/FSDP checkpoints and PeftModel state dicts; or write an adapter in
    another ecosystem's format (--to peft | mlx | gguf)."""
    with _expected_failures():
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


@app.command()
def merge(
    base: Path = typer.Argument(
        ...,
        metavar="[BASE]",
        help="Base checkpoint: folder, index, weights file or Hub id (org/name[@revision]). "
        "Omitted: the adapter's base_model_name_or_path. Alone: a training checkpoint "
        "(PeftModel state dict, DeepSpeed ZeRO, FSDP or HF Trainer folder) to merge.",
    ),
    adapter: list[Path] | None = typer.Argument(
        None,
        metavar="ADAPTER...",
        help="Adapter folder, adapter weights file or Hub id; several merge their weighted sum.",
    ),
    ckpt_base: Path | None = typer.Option(
        None, "--base", help="Training checkpoint only: base model for frozen weights and config."
    ),
    adapter_config: Path | None = typer.Option(
        None, help="Training checkpoint only: the adapter_config.json giving lora_alpha."
    ),
    output_path: Path | None = typer.Option(
        None, "-o", "--output", help="Output folder (must not exist unless --overwrite)."
    ),
    weights: str | None = typer.Option(
        None, help="One weight per adapter, comma-separated, e.g. 0.7,0.3 (default 1 each)."
    ),
    dtype: str = typer.Option("keep", help="Output dtype: keep, fp32, fp16 or bf16."),
    max_shard_size: str | None = typer.Option(
        None, help=SHARD_HELP + " Default: the base's own shard files."
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, write nothing."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    part: str | None = typer.Option(
        None, "--part", metavar="I/N", help="Write only part I of N (into OUT.lora-parts/)."
    ),
    join: bool = typer.Option(
        False, "--join", help="Check the parts written with --part and publish OUT."
    ),
    checksums: bool = typer.Option(
        True, "--checksums/--no-checksums", help="Write lora-checksums.sha256 (sha256 per file)."
    ),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
    quiet: bool = typer.Option(False, "-q", "--quiet", help=QUIET_HELP),
    quantize: str = typer.Option(
        "bf16",
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

    `lora merge ADAPTER -o OUT` takes the base from the adapter's config;
    `lora merge CKPT -o OUT [--base BASE]` merges a training checkpoint (PeftModel state
    dict, DeepSpeed ZeRO or FSDP folder, HF Trainer checkpoint-N/)."""
    with _expected_failures():
        from lora_cli import output, render
        from lora_cli.stages.merge import merge as run_merge

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
        if ckpt_base is not None or adapter_config is not None:
            from lora_cli.errors import UsageError

            raise UsageError(
                "--base and --adapter-config go with a single training checkpoint",
                "lora merge CKPT -o OUT --base BASE",
            )
        if not adapter:  # `lora merge ADAPTER -o OUT`: the base comes from adapter_config.json
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
    from lora_cli.io.checkpoint_detect import is_training_checkpoint

    return Path(path).exists() and is_training_checkpoint(Path(path))


@app.command()
def validate(
    path: Path = typer.Argument(
        ..., metavar="PATH", help="Checkpoint, adapter, weights file or Hub id to check."
    ),
    base: Path | None = typer.Option(
        None, help="Base checkpoint (or Hub id) PATH was merged from (with --adapter)."
    ),
    adapter: list[Path] | None = typer.Option(
        None, help="Adapter (or Hub id) PATH was merged with (with --base); repeat for several."
    ),
    weights: str | None = typer.Option(
        None, help="The --weights PATH was merged with, e.g. 0.7,0.3 (several adapters)."
    ),
    atol: float = typer.Option(0.0, help="Extra absolute tolerance for recomputed tensors."),
    rtol: float = typer.Option(0.0, help="Extra relative tolerance for recomputed tensors."),
    sample: int | None = typer.Option(
        None, help="Recompute only N untouched tensors (plus every adapter-touched one)."
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N] for recomputation."),
    part: str | None = typer.Option(
        None, "--part", metavar="I/N", help="Read only part I of N of the weight files."
    ),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Check integrity and numbers; exit 0 valid, 1 findings, 2 could not run."""
    with _expected_failures():
        from lora_cli import output, render
        from lora_cli.stages.validate import validate as run_validate

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
        )
        code = render.validate_report(report, json_out)
        raise typer.Exit(code)


def main() -> None:
    # OpenMP workers that spin between torch's many small ops burn a core for nothing in a
    # streaming merge (profiled: ~10% of its CPU); sleeping ones cost nothing. Before torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        app()
    except BrokenPipeError:  # `lora inspect --json x | head`
        sys.stderr.close()
        sys.exit(0)
