"""Split one merge across processes, machines or CI jobs, then join the parts.

``merge --part I/N`` writes only part I's output shards, chosen by a deterministic split
of the plan's shards balanced by bytes, into ``OUT.lora-parts/part-I-of-N/`` together with
a part record (``part.json``) that binds them to the inputs, the options and the lora
version. ``merge --join`` checks that every part is there, complete and from the same
inputs, then builds the output folder in a temporary sibling (shards hard-linked, or
copied where links are impossible), writes the index, config, side files and checksum
manifest, and renames it into place: the result is byte-identical to a one-process merge.

No scheduler of our own: parts only need a shared folder (or artifacts gathered into
one), so a GitHub Actions matrix, a Slurm array or a Kubernetes Indexed Job can run them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cli import __version__
from lora_cli.errors import LoraError, UsageError
from lora_cli.io.destination import parts_folder
from lora_cli.io.layout import sha256_file, write_json
from lora_cli.io.safetensors_format import plan_header
from lora_cli.io.writer import TMP_MARK, OutputDir, copy_file, io_error, pid_alive
from lora_cli.merge.part_record import (
    RECORD_NAME,
    PartError,
    PartRecord,
    ShardRecord,
    parse_pushed,
    read_record,
)
from lora_cli.merge.plan import MergePlan, ShardOut, TensorAction, shard_plans
from lora_cli.merge.run import (
    MergeResult,
    Progress,
    ShardDone,
    finish_output,
    merge_result,
    write_shards,
)

SAMPLE_BLOCKS = 16  # sampled 64 KiB blocks per base file in the fingerprint
SAMPLE_BYTES = 64 << 10
_PART_RE = re.compile(r"^part-(\d+)-of-(\d+)$")


@dataclass(frozen=True)
class Part:
    index: int  # 1-based
    count: int

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def dirname(self) -> str:
        return f"part-{self.index}-of-{self.count}"


def parse_part(text: str, option: str = "--part") -> Part:
    """``"2/8"`` → Part(2, 8); 1-based, like ``--array=1-8`` in Slurm."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise UsageError(f"{option} {text!r}: expected I/N, e.g. 2/8", "parts count from 1")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or not 1 <= index <= count:
        raise UsageError(
            f"{option} {text}: I must be between 1 and N", "parts count from 1: 1/N … N/N"
        )
    return Part(index, count)


def split_by_bytes(sizes: list[int], count: int) -> list[list[int]]:
    """Indices of ``sizes`` for each of ``count`` parts: largest first onto the lightest part
    (ties: lower index). Deterministic, so every job computes the same split on its own."""
    parts: list[list[int]] = [[] for _ in range(count)]
    load = [0] * count
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        target = min(range(count), key=lambda p: (load[p], p))
        parts[target].append(i)
        load[target] += sizes[i]
    return [sorted(p) for p in parts]


def part_shards(plan: MergePlan, part: Part) -> list[ShardOut]:
    """The plan's shards that ``part`` writes, in plan order."""
    sizes = [p.nbytes for p in shard_plans(plan)]
    return [plan.shards[i] for i in split_by_bytes(sizes, part.count)[part.index - 1]]


# -- what binds a part to its inputs ---------------------------------------------------------
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sample(path: Path) -> str:
    """Size, header and evenly spaced sampled blocks: tells two checkpoints of one
    architecture apart (same headers, other values) without reading the whole base."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        h.update(f.read(min(size, 1 << 20)))  # the header, whatever its length, mostly
        for k in range(SAMPLE_BLOCKS):
            f.seek(max(0, (size - SAMPLE_BYTES) * k // max(1, SAMPLE_BLOCKS - 1)))
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256(f"{path.name}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(plan: MergePlan, options: dict[str, Any]) -> dict[str, str]:
    """What a part is made from: lora version, options, the base (sampled), the adapter
    (in full: it is small) and the shard plan. Compared field by field at the join."""
    base_files = [p for p in plan.base.files]
    if plan.base.index_path is not None:
        base_files.append(plan.base.index_path)
    if plan.config is not None:
        base_files.append(plan.base.root / "config.json")
    adapters = [ad for ad, _ in plan.combined] or [plan.adapter]
    adapter_files = [p for ad in adapters for p in sorted({ad.weights_file, ad.config_path})]
    layout = [
        [s.filename, s.metadata, [[n, d, list(sh)] for n, d, sh in s.specs]]
        for s in shard_plans(plan)
    ]
    try:
        # a Hub commit names the base's bytes: nothing to read (sources/hub_remote.py)
        identity = getattr(plan.base, "identity", lambda: None)()
        base = _sha((identity or "\n".join(_file_sample(p) for p in base_files)).encode())
        adapter = _sha("\n".join(_file_digest(p) for p in adapter_files).encode())
    except OSError as exc:
        raise LoraError(f"cannot read the inputs to fingerprint them ({exc})") from None
    return {
        "lora_version": __version__,
        "options": json.dumps(options, sort_keys=True),
        "base": base,
        "adapter": adapter,
        "plan": _sha(json.dumps(layout, sort_keys=True).encode()),
    }


# -- writing one part ------------------------------------------------------------------------
def run_part(
    plan: MergePlan,
    output: Path,
    part: Part,
    options: dict[str, Any],
    *,
    device: str = "cpu",
    progress: Progress | None = None,
    on_shard: ShardDone | None = None,
) -> MergeResult:
    """Write part ``part``'s shards and its record; a rerun replaces the part.
    ``on_shard``: see ``write_shards`` (``merge/publish.py`` uploads and evicts there)."""
    start = time.perf_counter()
    shards = part_shards(plan, part)
    fp = fingerprint(plan, options)
    folder = parts_folder(output)
    try:
        folder.mkdir(exist_ok=True)
    except OSError as exc:
        raise io_error(folder, exc) from None
    with OutputDir(folder / part.dirname, overwrite=True) as out:
        # hashed whatever --checksums says: the record is what the join checks the bytes by
        written, digests, device = write_shards(
            plan, shards, out.path, device=device, progress=progress, checksums=True,
            on_shard=on_shard,
        )  # fmt: skip
        sizes = getattr(on_shard, "sizes", {})  # merge/publish.py: pushed shards are gone
        pushed = on_shard.record() if hasattr(on_shard, "record") else None
        record = PartRecord(part.index, part.count, fp, {
            name: ShardRecord(sizes.get(name) or (out.path / name).stat().st_size, digest)
            for name, digest in digests.items()
        }, pushed=parse_pushed(pushed, out.path / RECORD_NAME, "") if pushed else None)  # fmt: skip
        write_json(out.path / RECORD_NAME, record.to_json())
    files = [f"{folder.name}/{part.dirname}/{n}" for n in [*digests, RECORD_NAME]]
    result = merge_result(plan, output, files, device, time.perf_counter() - start, written)
    result.part = part.label
    result.counts = {k: 0 for k in result.counts}
    for act in part_actions(plan, part):
        result.counts[act.kind] += 1
    return result


# -- joining ---------------------------------------------------------------------------------
_WHAT = {
    "lora_version": "another lora version",
    "options": "other merge options",
    "base": "another base checkpoint",
    "adapter": "another adapter",
    "plan": "another shard layout",
}


def collect_parts(folder: Path, fp: dict[str, str]) -> tuple[Part, dict[int, PartRecord]]:
    """Every part record in ``folder``, checked; the split they share."""
    if not folder.is_dir():
        raise PartError(
            f"{folder}: no parts to join",
            "run `lora merge BASE ADAPTER -o OUT --part I/N` for every I first",
        )
    entries: dict[int, Path] = {}
    counts: dict[int, list[str]] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".part-") and TMP_MARK in entry.name:
            pid = entry.name.rpartition(TMP_MARK)[2].split(".")[0]
            if pid.isdigit() and pid_alive(int(pid)):
                raise PartError(
                    f"{entry}: a part is still being written (process {pid})",
                    "wait for every part to finish, then join",
                )
            continue
        m = _PART_RE.match(entry.name)
        if m and entry.is_symlink():
            raise PartError(
                f"{entry}: a part folder is a symbolic link (to {os.readlink(entry)})",
                "gather the parts' folders themselves into the parts folder",
            )
        if m:
            counts.setdefault(int(m.group(2)), []).append(entry.name)
            entries[int(m.group(1))] = entry
    if not counts:
        raise PartError(
            f"{folder}: no parts to join",
            "run `lora merge BASE ADAPTER -o OUT --part I/N` for every I first",
        )
    if len(counts) > 1:
        split = ", ".join(f"{names[0]} (N={n})" for n, names in sorted(counts.items()))
        raise PartError(
            f"{folder}: parts from different splits: {split}",
            "remove the stale parts; every part of one merge uses the same N",
        )
    count = next(iter(counts))
    for index in range(1, count + 1):
        if index not in entries:
            raise PartError(
                f"{folder}: part {index}/{count} is missing",
                f"run: lora merge BASE ADAPTER -o OUT --part {index}/{count}",
            )
    found: dict[int, PartRecord] = {}
    for index, entry in sorted(entries.items()):
        record_path = entry / RECORD_NAME
        rerun = f"rerun it: lora merge … --part {index}/{count}"
        if not record_path.is_file():
            raise PartError(
                f"{entry}: part {index}/{count} is incomplete (no {RECORD_NAME})", rerun
            )
        record = read_record(record_path, rerun)
        if (record.part, record.of) != (index, count):
            raise PartError(
                f"{record_path}: not the record of part {index}/{count} "
                f"(it says part {record.part}/{record.of}): a duplicated part?",
                "keep one folder per part, named part-I-of-N",
            )
        for key, what in _WHAT.items():
            if record.fingerprint[key] != fp[key]:
                extra = (
                    f" {record.fingerprint[key]}, not {fp[key]}" if key == "lora_version" else ""
                )
                raise PartError(
                    f"{entry}: part {index}/{count} is stale or foreign: made from {what}{extra}",
                    f"rerun it with the join's inputs and options: lora merge … --part "
                    f"{index}/{count}",
                )
        found[index] = record
    return Part(1, count), found


def _check_shards(
    folder: Path, plan: MergePlan, count: int, records: dict[int, PartRecord]
) -> dict[str, Path]:
    """Each part holds exactly its planned shards, complete: size and header as planned.
    Returns every shard's file, in plan order."""
    specs = {s.filename: s for s in shard_plans(plan)}
    owner: dict[str, int] = {}
    files: dict[str, Path] = {}
    for index, record in sorted(records.items()):
        part = Part(index, count)
        rerun = f"rerun it: lora merge … --part {part.label}"
        want = [s.filename for s in part_shards(plan, part)]
        for name in record.shards:
            if name in owner:
                raise PartError(
                    f"{folder / part.dirname}: shard {name} is also in part {owner[name]}/"
                    f"{count} (duplicated)",
                    "remove the stray copy; each shard belongs to one part",
                )
            owner[name] = index
        if sorted(record.shards) != sorted(want):
            raise PartError(
                f"{folder / part.dirname}: part {part.label} holds {sorted(record.shards)}, "
                f"planned {want}",
                rerun,
            )
        for name in want:
            path = folder / part.dirname / name
            header, entries = plan_header(specs[name].specs, _metadata(plan, name))
            size = len(header) + (entries[-1].end if entries else 0)
            ok = (
                path.is_file()
                and not path.is_symlink()
                and path.stat().st_size == size == record.shards[name].nbytes
            )
            if ok:
                with open(path, "rb") as f:
                    ok = f.read(len(header)) == header
            if not ok:
                raise PartError(
                    f"{path}: shard of part {part.label} is missing, truncated or altered", rerun
                )
            files[name] = path
    return {s.filename: files[s.filename] for s in plan.shards}


def _metadata(plan: MergePlan, filename: str) -> dict[str, str]:
    shard = next(s for s in plan.shards if s.filename == filename)
    meta = dict(shard.metadata)
    if plan.untied:
        meta.pop("lm_head.weight", None)
    return meta


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link costs no bytes; filesystems without links (or across devices) get a copy."""
    try:
        os.link(src, dst)
    except OSError:
        copy_file(src, dst)


def verify_digests(
    published: dict[str, Path],
    sources: dict[str, Path],
    want: dict[str, str],
    labels: dict[str, str],
) -> None:
    """Re-hash every published shard (one sequential read each, several at once): a byte
    changed since its part hashed it while writing is refused, not published."""
    from concurrent.futures import ThreadPoolExecutor

    workers = max(1, min(4, os.cpu_count() or 1, len(published)))
    with ThreadPoolExecutor(workers, thread_name_prefix="lora-join-hash") as pool:
        got = dict(zip(published, pool.map(_digest, published.values()), strict=True))
    for name, digest in got.items():
        if digest != want[name]:
            raise PartError(
                f"{sources[name]}: shard of part {labels[name]} does not match the sha256 its "
                "part recorded (altered or corrupted since it was written)",
                f"rerun it: lora merge … --part {labels[name]}",
            )


def _digest(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def run_join(
    plan: MergePlan,
    output: Path,
    options: dict[str, Any],
    *,
    overwrite: bool = False,
    model_card: str | None = None,
) -> MergeResult:
    """Check every part and every shard's bytes, then publish the whole output folder at once."""
    start = time.perf_counter()
    folder = parts_folder(output)
    fp = fingerprint(plan, options)
    split, records = collect_parts(folder, fp)
    sources = _check_shards(folder, plan, split.count, records)
    shard_records = {n: r for rec in records.values() for n, r in rec.shards.items()}
    labels = {n: f"{i}/{split.count}" for i, rec in records.items() for n in rec.shards}
    digests = {name: shard_records[name].sha256 for name in sources}
    with OutputDir(output, overwrite) as out:
        published = {name: out.path / name for name in sources}
        for name, src in sources.items():
            _link_or_copy(src, published[name])
        verify_digests(published, sources, digests, labels)
        files = finish_output(plan, out.path, digests, options.get("checksums", True), model_card)
    shutil.rmtree(folder, ignore_errors=True)
    written = sum(r.nbytes for r in shard_records.values())
    result = merge_result(plan, output, files, "-", time.perf_counter() - start, written)
    result.part = f"joined {split.count}"
    return result


def part_actions(plan: MergePlan, part: Part) -> list[TensorAction]:
    """The tensors ``part`` writes (its progress total)."""
    return [a for s in part_shards(plan, part) for a in s.actions]
