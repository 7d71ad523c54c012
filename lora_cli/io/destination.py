"""Where a run may write: every path it creates, replaces or deletes, checked against every
input before anything is written.

A run that writes ``OUT`` touches only entries of OUT's real parent folder: ``OUT`` itself,
its temporaries ``.OUT.lora-tmp-*`` (the ``.old`` swap of ``--overwrite`` among them, and the
leftovers of killed runs, which the next run deletes) and, for a split merge, the parts folder
``OUT.lora-parts`` (which ``--join`` deletes). None of those may be, hold or sit inside an
input, compared by real path (symlinks followed): a base folder named ``OUT.lora-parts`` or a
symlinked shard pointing into ``OUT`` is refused up front, not deleted at the end.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from lora_cli.errors import UsageError
from lora_cli.io.hub_cache import in_hub_cache

TMP_MARK = ".lora-tmp-"
PARTS_SUFFIX = ".lora-parts"
WALK_DEPTH = 4  # symlinks this deep inside an input folder are followed to their targets
WALK_ENTRIES = 50_000  # bound on the entries listed per input (a ZeRO folder holds thousands)
FIX = "choose an output path outside the inputs; inputs are never modified"


def destination_path(final: Path | str) -> Path:
    """``final`` with its parent folder's symlinks resolved, its own last component kept:
    the path every rename and delete of this run goes through."""
    final = Path(os.path.abspath(final))
    return final.parent.resolve() / final.name


def parts_folder(output: Path | str) -> Path:
    """Where ``merge --part`` writes and ``merge --join`` reads (and then deletes)."""
    output = destination_path(output)
    return output.parent / f"{output.name}{PARTS_SUFFIX}"


def _touched(name: str, parts: bool) -> dict[str, str]:
    """Entry names of the output's parent folder this run may write or delete, by role:
    exact names, and the temporaries' prefix (``prefix*``)."""
    roles = {name: "output", f".{name}{TMP_MARK}*": "temporary"}
    if parts:
        roles[f"{name}{PARTS_SUFFIX}"] = "parts folder"
    return roles


def _role(entry: str, roles: dict[str, str]) -> str | None:
    for pattern, role in roles.items():
        if entry == pattern or (pattern.endswith("*") and entry.startswith(pattern[:-1])):
            return role
    return None


def _walk_links(folder: Path) -> Iterator[Path]:
    """Targets of the symlinks inside ``folder`` (bounded depth and count): the files a
    run reads through them live there, not under the folder."""
    stack, listed = [(folder, 0)], 0
    while stack:
        here, depth = stack.pop()
        try:
            with os.scandir(here) as entries:
                for entry in entries:
                    listed += 1
                    if listed > WALK_ENTRIES:
                        return
                    if entry.is_symlink():
                        yield Path(os.path.realpath(entry.path))
                    elif depth < WALK_DEPTH and entry.is_dir(follow_symlinks=False):
                        stack.append((Path(entry.path), depth + 1))
        except OSError:
            continue


def real_inputs(inputs: Iterable[Path | str]) -> list[tuple[Path, Path]]:
    """(real path, path as named) for every input and what it reads: a folder with the
    targets of its symlinks; a file with its folder's other files (config, index, shards
    and side files are read from beside a weights file)."""
    found: dict[Path, Path] = {}
    for named in inputs:
        named = Path(named)
        if not os.path.lexists(named):
            continue
        real = Path(os.path.realpath(named))
        found.setdefault(real, named)
        if real.is_dir():
            for target in _walk_links(real):
                found.setdefault(target, named)
        else:
            try:
                with os.scandir(real.parent) as entries:
                    for i, entry in enumerate(entries):
                        if i >= WALK_ENTRIES:
                            break
                        if entry.is_file():  # follows links: a linked shard counts
                            found.setdefault(Path(os.path.realpath(entry.path)), named)
            except OSError:
                pass
    return list(found.items())


def _check_linked_parts_folder(dest: Path, shown: Path, inputs: Iterable[Path | str]) -> None:
    """A parts folder that is a symlink (say, to shared scratch) is written and deleted
    through its target: that target may not overlap an input either."""
    folder = dest.parent / f"{dest.name}{PARTS_SUFFIX}"
    if not folder.is_symlink():
        return
    real = Path(os.path.realpath(folder))
    for inp, named in real_inputs(inputs):
        if real == inp or real in inp.parents or inp in real.parents:
            raise UsageError(
                f"output {shown}: its parts folder {folder} links to {real}, which overlaps "
                f"the input {named}",
                "choose another output name; inputs are never modified",
            )


def _refuse_cache_output(output: Path) -> None:
    """Outputs never go into the Hugging Face cache: huggingface_hub alone manages it (its
    snapshots are links to shared, content-addressed blobs)."""
    if in_hub_cache(output):
        raise UsageError(
            f"output {output} is inside the Hugging Face cache, which lora never writes to",
            "pass -o OUTPUT outside the cache",
        )


def check_destination(
    final: Path | str,
    overwrite: bool,
    inputs: Iterable[Path | str],
    *,
    parts: bool = False,
    file_output: bool = False,
) -> None:
    """Refuse a destination that would write into, replace or delete an input, or that
    is not a plain new (or, with ``overwrite``, replaceable) path, before any work starts.

    ``parts``: the run also writes or deletes ``OUT.lora-parts`` (``merge --part/--join``).
    ``file_output``: the output is one file (``convert --to gguf``), not a folder.
    """
    shown = Path(os.path.abspath(final))
    if shown.name in ("", ".", ".."):
        raise UsageError(f"output {final} does not name a new entry", "pass -o PARENT/NAME")
    dest = destination_path(shown)
    _refuse_cache_output(dest)
    roles = _touched(dest.name, parts)
    for real, named in real_inputs(inputs):
        if real in dest.parents:
            raise UsageError(f"output {shown} is inside the input {named}", FIX)
        if dest.parent in real.parents:
            entry = real.relative_to(dest.parent).parts[0]
            role = _role(entry, roles)
            if role == "output":
                raise UsageError(f"output {shown} contains the input {named}", FIX)
            if role is not None:
                raise UsageError(
                    f"output {shown}: its {role} {dest.parent / entry} would hold or delete "
                    f"the input {named}",
                    "choose another output name; inputs are never modified",
                )
    if parts:
        _check_linked_parts_folder(dest, shown, inputs)
    if dest.is_symlink():
        target = os.readlink(dest)
        raise UsageError(
            f"output {shown} is a symbolic link (to {target})",
            "remove the link or choose another output path",
        )
    if dest.exists():
        if not overwrite:
            raise UsageError(f"output {shown} already exists", "pass --overwrite to replace it")
        if file_output and dest.is_dir():
            raise UsageError(
                f"output {shown} is a folder; this command writes one file there",
                "choose a file path",
            )
        if not file_output and not dest.is_dir():
            raise UsageError(
                f"output {shown} is a file; this command writes a folder there",
                "remove the file or choose another output path",
            )
    parent = dest.parent
    if not parent.is_dir():
        raise UsageError(f"output folder {shown.parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to {shown.parent} (permission denied)")
