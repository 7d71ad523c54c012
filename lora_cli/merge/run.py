"""Execute a merge plan: stream base tensors, apply the math on the device, write shards.

Host memory stays at about one tensor (plus its fp32 working copy): untouched
tensors go file-to-file through the kernel, touched ones are read, merged and
written one at a time while the next one is read ahead on a second thread.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_cli.adapters.findings import refuse_or_warn, value_findings
from lora_cli.adapters.peft import check_adapter_values
from lora_cli.errors import MergeError
from lora_cli.io.dtypes import to_torch
from lora_cli.io.layout import (
    MANIFEST_NAME,
    copy_side_files,
    fsync_file,
    sha256_file,
    write_index,
    write_json,
    write_manifest,
)
from lora_cli.io.writer import OutputDir, ShardWriter, copy_file, write_small_file
from lora_cli.merge.card import CARD_NAME
from lora_cli.merge.plan import MergePlan, ShardOut, TensorAction, shard_plans
from lora_cli.merge.requant import write_order
from lora_cli.preload import torch_loading, wait_for_torch

if TYPE_CHECKING:
    import torch

Progress = Callable[[int, str], None]
# Told of each output shard once it is complete, fsynced and hashed: (file name, path, sha256
# or ""). ``merge/publish.py`` uploads and evicts there; while it runs, no next shard starts.
ShardDone = Callable[[str, Path, str], None]


def resolve_device(spec: str) -> str:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; explicit CUDA must exist."""
    from lora_cli.errors import UsageError

    spec = spec.strip().lower()
    if spec == "cpu":
        return "cpu"
    import torch

    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return "cpu"
    if spec.startswith("cuda"):
        # fp32 matmuls must stay fp32 (TF32 would cost ~3 decimal digits of the delta)
        torch.backends.cuda.matmul.allow_tf32 = False
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: no CUDA device is available", "use --device cpu")
        suffix = spec.split(":", 1)[1] if ":" in spec else "0"
        if not suffix.isdigit():
            raise UsageError(f"unknown device {spec!r}", "use auto, cpu or cuda[:N]")
        index = int(suffix)
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} GPUs visible")
        return f"cuda:{index}"
    raise UsageError(f"unknown device {spec!r}", "use auto, cpu or cuda[:N]")


def compute_tensor(  # noqa: PLR0912 - one branch per kind of merge op
    plan: MergePlan,
    action: TensorAction,
    device: str,
    buffer: torch.Tensor | None = None,
    rows: tuple[int, int] | None = None,
    start: torch.Tensor | None = None,
    keep_device: bool = False,
) -> torch.Tensor:
    """The output value of one planned tensor, as a CPU tensor of the planned dtype.

    Shared by ``merge`` and ``validate`` so that both run the same arithmetic.
    ``buffer``: scratch memory to read the starting value into (may hold the result).
    ``rows``: only those output rows (for actions where ``row_blocks`` allows it).
    ``start``: the starting value, already read (merged in place); ``keep_device``: leave
    the result on ``device`` (a re-quantized weight is encoded there).
    """
    if action.quant is not None:  # one part of a re-quantized weight (merge/requant.py)

        def merge(act: TensorAction, rows: Any, start: torch.Tensor) -> torch.Tensor:
            return compute_tensor(plan, act, device, None, rows, start, keep_device=True)

        return action.quant.compute(merge, device, rows)
    from lora_cli.merge import math as lora_math  # (torch: see run_merge's early copies)

    src = plan.adapter.source
    cuda = device.startswith("cuda")
    if start is not None:
        value = start
    elif action.replacement:
        value = src.read(action.replacement, pin=cuda, out=buffer)
    elif action.base in getattr(plan.base, "exposed", ()):  # a quantized weight: decoded
        value = plan.base.read(action.base, rows=rows, device=device)  # where it is merged
    else:
        value = plan.base.read(action.base, pin=cuda, out=buffer, rows=rows)
    # The planned dtype is the base's, or --dtype's: like loading the base (and a
    # replacement into it) in that dtype before merging.
    value = value.to(device=device, dtype=to_torch(action.dtype), non_blocking=cuda)

    def factor(key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return src.read(key, rows=rows).to(device)

    weighted = [op for op in action.loras if op.weight is not None]
    if weighted:  # several adapters: one weighted sum, rounded once (merge_weighted)
        factors = []
        for op in weighted:
            parts = op.module.parts
            a = factor(parts.get("lora_A.weight") or parts["lora_embedding_A"])
            b_key = parts.get("lora_B.weight")
            b = factor(b_key, rows) if b_key else factor(parts["lora_embedding_B"])
            factors.append((a, b, op.weight, op.module.scale))
        op = weighted[0]
        value = lora_math.merge_weighted(
            value, factors, kind=op.kind, fan_in_fan_out=op.fan_in_fan_out, inplace=True
        )
    for op in action.loras:
        if op.weight is not None:
            continue
        m = op.module
        if op.kind == "embedding":
            a, b = factor(m.parts["lora_embedding_A"]), factor(m.parts["lora_embedding_B"])
        else:  # row i of W + s·B@A only needs row i of B
            a, b = factor(m.parts["lora_A.weight"]), factor(m.parts["lora_B.weight"], rows)
        if op.block == "A":  # BD-LoRA (never row-blocked: see row_blocks)
            a = lora_math.block_diagonal(a, op.nblocks)
        elif op.block == "B":
            b = lora_math.block_diagonal(b, op.nblocks)
        mag = m.parts.get("lora_magnitude_vector")
        value = lora_math.merge_weight(
            value,
            a,
            b,
            m.scale,
            kind=op.kind,
            fan_in_fan_out=op.fan_in_fan_out,
            magnitude=factor(mag) if mag else None,
            rounding=op.rounding,
            inplace=True,  # ``value`` is this function's own buffer
        )
    for ex in action.experts:
        a, b = factor(ex.module.parts["lora_A.weight"]), factor(ex.module.parts["lora_B.weight"])
        if ex.expert is None:  # (rows: a range of the fused tensor's experts)
            shape = plan.base.info(action.base).shape if rows else None
            value = lora_math.merge_expert_param(
                value,
                a,
                b,
                ex.scale,
                layout=ex.layout,
                expert_rows=rows,
                param_shape=shape,
                inplace=True,  # ``value`` is this function's own buffer
            )
        else:  # (rows: rows of this expert's share of the delta)
            share = ex.rows
            if rows is not None:
                offset = ex.rows[0] if ex.rows else 0
                share = (offset + rows[0], offset + rows[1])
            value = lora_math.merge_expert_slice(
                value, a, b, ex.scale, experts=ex.experts, expert=ex.expert, rows=share
            )
    if action.bias is not None:
        m = action.bias
        value = lora_math.merge_bias(value, factor(m.parts["lora_B.bias"]), m.scale)
    if action.rows is not None:
        key, indices = action.rows
        value = lora_math.replace_rows(value, indices, factor(key))
    merged = action.loras or action.experts or action.bias is not None or action.rows is not None
    if merged and not lora_math.all_finite(value):
        raise _nonfinite_merge(plan, action, rows)
    return value if keep_device else value.to("cpu")


def _nonfinite_merge(
    plan: MergePlan, action: TensorAction, rows: tuple[int, int] | None
) -> MergeError:
    """Why a merged tensor holds NaN/Inf (the slow diagnosis runs only on this path)."""
    from lora_cli.merge import math as lora_math

    name = action.replacement or action.base
    source = plan.adapter.source if action.replacement else plan.base
    start = source.read(name, rows=rows) if name else None
    if start is not None and not lora_math.all_finite(start):
        return MergeError(
            f"{source.root}: tensor {name!r} already holds NaN/Inf values; merging into it "
            "would publish them",
            "use a base checkpoint whose weights are finite",
        )
    scales = sorted({op.module.scale for op in action.loras} | {e.scale for e in action.experts})
    return MergeError(
        f"{plan.adapter.config_path}: merging into {name!r} overflows {action.dtype} "
        f"(scale {', '.join(f'{s:g}' for s in scales) or '?'} × B@A is too large); nothing "
        "was written",
        "check lora_alpha / the scale in the adapter config: the merged weights would be NaN/Inf",
    )


@dataclass
class MergeResult:
    output: Path
    files: list[str]
    counts: dict[str, int]
    rule: str
    device: str
    seconds: float
    bytes_written: int
    untied: bool
    config_updates: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    tokenizer_from: dict[str, Any] | None = None  # the adapter's tokenizer files, if used
    adapters: list[dict[str, Any]] = field(default_factory=list)  # several: path and weight
    quantized: list[dict[str, Any]] = field(default_factory=list)  # --quantize keep fidelity
    part: str | None = None  # "I/N" for `merge --part`, "joined N" for `merge --join`
    renames: list[dict[str, Any]] = field(default_factory=list)  # MergePlan.renames()
    fetched: dict[str, Any] | None = None  # a Hub base: headers and shards fetched, evicted
    pushed: dict[str, Any] | None = None  # --push-to-hub: repo, shards uploaded, commit

    @property
    def throughput(self) -> float:
        return self.bytes_written / self.seconds if self.seconds > 0 else 0.0


class BufferPool:
    """A few reusable read buffers.

    A fresh multi-megabyte allocation is a new anonymous mapping whose every page the
    kernel must fault in and zero; on a 6 GB merge that was ~1.5 M page faults and
    seconds of system time. Layers repeat their shapes, so a handful of buffers serve
    the whole model.
    """

    def __init__(self, pin: bool, keep: int = 4) -> None:
        self.pin = pin
        self.keep = keep
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        import torch

        with self._lock:  # (by index: list.remove would compare tensors elementwise)
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def give(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buffer)
            if len(self._free) > self.keep:
                smallest = min(range(len(self._free)), key=lambda i: self._free[i].numel())
                self._free.pop(smallest)


BLOCK_BYTES = 16 << 20
# torch intra-op threads of each CPU merge worker. torch picks kernels by thread count (a
# conv is im2col + GEMM at one thread, oneDNN with fused multiply-add at more), so this
# number is part of the result's bits: tests pin PEFT's oracle to it (tests/peft_oracle.py).
CPU_MATH_THREADS = 1
# A quantized weight's block is decoded, merged and (with --quantize keep) re-encoded through
# a few fp32/int32 copies of itself: 2 MiB bf16 blocks keep a keep merge's peak RSS near the
# bf16 merge's (measured on a 160 MB base: 16 MiB blocks 400-590 MiB, 4 MiB 300-390 MiB,
# 2 MiB 280-340 MiB, 1 MiB 270-280 MiB; CPU time the same within a loaded machine's noise).
QUANT_BLOCK_DIVISOR = 8
AHEAD_BYTES = 64 << 20  # merged blocks computed ahead of the writer, all workers together


def cpu_workers() -> int:
    """Merge-math threads on the CPU: one per core this process may use (``taskset``, cgroup
    cpusets) after the one the writer thread keeps busy copying and hashing, at most 8; each
    runs torch single-threaded. Tensors in parallel beat torch's own intra-op threads here:
    its OpenMP workers spun between the many small ops (~10% of a merge's CPU, profiled)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores - 1, 8))


def row_blocks(plan: MergePlan, act: TensorAction) -> list[tuple[int, int]] | None:
    """Row ranges to merge a tensor in, or None to merge it whole.

    A plain Linear LoRA gives each output row from the same input row alone
    (``W[i] + s·B[i]@A``), so big projections stream through in ~16 MB blocks and
    memory stays flat whatever the tensor or model size; so does a weighted sum of several
    adapters' Linear LoRAs, and a fused expert tensor's LoRA, expert by expert (rows of its
    first dimension). A re-quantized weight's blocks start and end where its scales do
    (``merge/requant.py``). Everything else (DoRA norms, transposed or conv layouts,
    replacements) takes the whole tensor.
    """
    unit = 1
    if act.quant is not None:
        unit = act.quant.group.unit if act.quant.role == "weight" else None
        if unit is None:
            return None
        act = act.quant.group.merge
    info = plan.base.info(act.base) if act.base else None
    budget = BLOCK_BYTES
    if act.base in getattr(plan.base, "exposed", ()):  # decoded via fp32: smaller blocks
        budget = max(1, BLOCK_BYTES // QUANT_BLOCK_DIVISOR)
    if (
        info is None
        or act.replacement
        or act.bias
        or act.rows
        or (act.experts and act.loras)
        or not _experts_stream(act, len(info.shape))
        or (len(act.loras) > 1 and any(op.weight is None for op in act.loras))
        or any(op.kind != "linear" or op.fan_in_fan_out or op.block for op in act.loras)
        or any("lora_magnitude_vector" in op.module.parts for op in act.loras)
        or not plan.base.reads_rows(info.name)
        or info.dtype != act.dtype
        or (len(info.shape) != 2 and not act.experts)
        or info.nbytes <= budget
    ):
        return None
    from lora_cli.merge.math import MIN_GEMM_ROWS, row_spans

    step = max(1, budget // (info.nbytes // info.shape[0]) // unit) * unit
    # a 2-D weight's short last block would take the few-row GEMM kernel (other bits than
    # PEFT's); a fused expert tensor's blocks are whole experts. Blocks start on ``unit``s.
    return row_spans(info.shape[0], step, MIN_GEMM_ROWS if len(info.shape) == 2 else 1)


def _experts_stream(act: TensorAction, dims: int) -> bool:
    """Expert deltas that merge in row blocks: a fused 3-D parameter's, expert by expert,
    or a per-expert 2-D tensor's share of one (its rows of that expert's delta)."""
    if not act.experts:
        return True
    fused = {ex.expert is None for ex in act.experts}
    return fused == {True} and dims == 3 or fused == {False} and dims == 2


def _start_bytes(plan: MergePlan, act: TensorAction, rows: tuple[int, int] | None) -> int:
    if act.quant is not None:  # re-quantized parts decode into their own tensors
        return 0
    if act.replacement:
        return plan.adapter.source.info(act.replacement).nbytes
    info = plan.base.info(act.base) if act.base else None
    if info is None:
        return 0
    return info.nbytes if rows is None else (rows[1] - rows[0]) * (info.nbytes // info.shape[0])


Item = tuple[TensorAction, tuple[int, int] | None]


def _computed(
    plan: MergePlan,
    actions: list[TensorAction],
    device: str,
    workers: ThreadPoolExecutor,
    buffers: BufferPool,
    depth: int = 1,
) -> Iterator[tuple[TensorAction, tuple[int, int] | None, torch.Tensor | None]]:
    """Yield (action, rows, value) in write order, computing up to ``depth`` items ahead
    (one per worker thread) while at most ``AHEAD_BYTES`` of them wait in memory.

    ``value`` is None for tensors copied file-to-file. A value's buffer goes back to
    the pool when the caller asks for the next item, i.e. after it has been written.
    """
    items: list[Item] = []
    for act in actions:
        if act.kind == "copy" and not _needs_decode(plan, act):
            items.append((act, None))
        else:
            items += [(act, r) for r in (row_blocks(plan, act) or [None])]
    todo = [i for i in items if i[0].kind != "copy" or _needs_decode(plan, i[0])]
    for act, rows in todo:
        if act.quant is not None and rows is not None:
            act.quant.group.expect()  # its other parts wait for this block
    todo.reverse()
    pending: list[tuple[Future, torch.Tensor]] = []

    def submit_more() -> None:
        ahead = sum(b.numel() for _, b in pending)
        while todo and len(pending) < depth:
            act, rows = todo[-1]
            nbytes = _start_bytes(plan, act, rows)
            if pending and ahead + nbytes > AHEAD_BYTES:
                return
            todo.pop()
            buf = buffers.take(nbytes)
            job = workers.submit(compute_tensor, plan, act, device, buf, rows)
            pending.append((job, buf))
            ahead += buf.numel()

    submit_more()
    for act, rows in items:
        if act.kind == "copy" and not _needs_decode(plan, act):
            yield act, rows, None
            continue
        job, buf = pending.pop(0)
        submit_more()
        try:
            yield act, rows, job.result()
        finally:
            buffers.give(buf)


def _needs_decode(plan: MergePlan, act: TensorAction) -> bool:
    info = plan.base.info(act.base) if act.base else None
    return info is None or info.raw_offset is None or info.dtype != act.dtype


def write_shards(
    plan: MergePlan,
    shards: list[ShardOut],
    folder: Path,
    *,
    device: str = "cpu",
    progress: Progress | None = None,
    checksums: bool = True,
    on_shard: ShardDone | None = None,
) -> tuple[int, dict[str, str], str]:
    """Write ``shards`` of the plan into ``folder``; (bytes written, file name → sha256
    or ``""`` with ``checksums=False``, the device the math ran on: ``device`` resolved).
    ``on_shard`` hears of each finished shard (then at most one shard is written ahead
    of it, and the early copies stay in the first shard: the disk holds about two).

    Each shard is hashed as it is written (``TrailingHash``) and fsynced on a spare
    thread while the next one is written. ``merge --part`` calls this with its share of
    the plan's shards. While torch is still importing (``preload``), untouched tensors
    are copied ahead; the adapters' deferred NaN/Inf scan runs before any merged tensor.
    """
    specs = {s.filename: s for s in shard_plans(plan)}
    writers: dict[str, ShardWriter] = {}

    def open_writer(shard: ShardOut) -> ShardWriter:
        if shard.filename not in writers:
            meta = dict(shard.metadata)
            if plan.untied:
                meta.pop("lm_head.weight", None)
            writers[shard.filename] = ShardWriter(
                folder / shard.filename, specs[shard.filename].specs, meta, hashed=checksums
            )
        return writers[shard.filename]

    def copy(writer: ShardWriter, act: TensorAction) -> int:
        info = plan.base.info(act.base)
        writer.copy_from(act.name, plan.base.fd(info.file), info.raw_offset, info.nbytes)
        if progress:
            progress(info.nbytes, act.name)
        return info.nbytes

    try:
        ahead = shards[:1] if on_shard else shards
        written, early = _copy_while_torch_loads(plan, ahead, open_writer, copy)
        wait_for_torch()  # interruptible, unlike a wait inside `import torch`
        for adapter in [ad for ad, _ in plan.combined] or [plan.adapter]:
            if adapter.values_pending:
                check_adapter_values(adapter)
                plan.warnings += refuse_or_warn(value_findings(adapter))  # as validate does
        device = resolve_device(device)  # ("auto" asks torch: after the early copies)
        written, digests = _write_rest(
            plan, shards, open_writer, copy, early, written, device, checksums, progress, on_shard
        )
        return written, digests, device
    finally:
        for writer in writers.values():
            writer.abort()  # (a no-op for the shards already closed)


def _copy_while_torch_loads(
    plan: MergePlan,
    shards: list[ShardOut],
    open_writer: Callable[[ShardOut], ShardWriter],
    copy: Callable[[ShardWriter, TensorAction], int],
) -> tuple[int, set[str]]:
    """Copy untouched tensors, shard after shard, for as long as torch is still importing
    (bytes copied, names done). Needs no torch: headers, offsets and the kernel's copy."""
    written, done = 0, set()
    for shard in shards:
        if not torch_loading():
            break
        writer = None
        for act in shard.actions:
            if not torch_loading():
                break
            if act.kind == "copy" and not _needs_decode(plan, act):
                writer = writer or open_writer(shard)
                written += copy(writer, act)
                done.add(act.name)
    return written, done


def _write_rest(
    plan: MergePlan,
    shards: list[ShardOut],
    open_writer: Callable[[ShardOut], ShardWriter],
    copy: Callable[[ShardWriter, TensorAction], int],
    done: set[str],
    written: int,
    device: str,
    checksums: bool,
    progress: Progress | None,
    on_shard: ShardDone | None = None,
) -> tuple[int, dict[str, str]]:
    """Everything ``_copy_while_torch_loads`` left, shard by shard in file order."""
    import torch

    digests: dict[str, Future] = {}
    cuda = device.startswith("cuda")
    depth = 1 if cuda else cpu_workers()
    intra = torch.get_num_threads() if cuda else CPU_MATH_THREADS
    gc.freeze()  # torch's import left ~10⁵ objects that every collection would walk again
    with (
        ThreadPoolExecutor(depth, initializer=torch.set_num_threads, initargs=(intra,)) as workers,
        ThreadPoolExecutor(1) as finisher,
        torch_threads(intra),
    ):
        buffers = BufferPool(pin=cuda, keep=depth + 3)
        for shard in shards:
            if on_shard and digests:
                next(reversed(digests.values())).result()  # one shard at a time on disk
            writer = open_writer(shard)
            todo = [a for a in shard.actions if a.name not in done]
            starts = {name: entry.start for name, entry in writer.entries.items()}
            order = sorted(todo, key=lambda a: write_order(a, starts.__getitem__))
            for act, rows, value in _computed(plan, order, device, workers, buffers, depth):
                if value is None:
                    written += copy(writer, act)
                    continue
                if rows is not None:
                    writer.write_rows(act.name, rows[0], value)
                    nbytes = value.numel() * value.element_size()
                else:
                    writer.write(act.name, value)
                    nbytes = writer.entries[act.name].nbytes
                del value
                written += nbytes
                if progress:
                    progress(nbytes, act.name)
            writer.close(sync=False)
            digests[shard.filename] = finisher.submit(_finish_shard, writer, checksums, on_shard)
        return written, {name: f.result() for name, f in digests.items()}


def _finish_shard(writer: ShardWriter, checksums: bool, on_shard: ShardDone | None = None) -> str:
    """fsync a closed shard and return its sha256 (``""`` without checksums), on a spare
    thread while the next shard is written. The digest comes from the writer's trailing
    hash; should that have failed, the file is read back. Then ``on_shard`` hears of it."""
    fsync_file(writer.path)
    digest = (writer.digest() or sha256_file(writer.path)) if checksums else ""
    if on_shard:
        on_shard(writer.path.name, writer.path, digest)
    return digest


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def finish_output(
    plan: MergePlan,
    folder: Path,
    digests: dict[str, str],
    checksums: bool = True,
    model_card: str | None = None,
) -> list[str]:
    """Everything but the shards: index, side files, config.json, the model card
    (``model_card``: the output's README.md; the base's own card is then not copied) and the
    checksum manifest (``digests``: the shards' sha256, already known; none with
    ``checksums=False``). Returns the names written."""
    files = list(digests)
    specs = shard_plans(plan)
    if len(specs) > 1 or plan.base.index_path is not None:
        index = write_index(folder, specs) if len(specs) > 1 else None
        if index:
            files.append(index.name)
    skip = {"config.json"} if plan.config is not None else set()
    if model_card is not None:
        skip.add(CARD_NAME)
        write_small_file(folder / CARD_NAME, model_card.encode())
        files.append(CARD_NAME)
    theirs = plan.side_files
    if theirs is not None:  # the adapter's tokenizer / chat template (merge/side_files.py)
        skip |= theirs.replaces
        for p in theirs.files:
            copy_file(p, folder / p.name)
            files.append(p.name)
    files += copy_side_files(plan.base.root, folder, skip=skip | {MANIFEST_NAME})
    if plan.config is not None:
        config = dict(plan.config)
        config.update(plan.config_updates)
        for key in [k for k, v in plan.config_updates.items() if v is None]:
            del config[key]  # e.g. quantization_config once nothing quantized remains
        if "tie_word_embeddings" in plan.config_updates and isinstance(
            config.get("text_config"), dict
        ):
            config["text_config"] = {**config["text_config"], "tie_word_embeddings": False}
        write_json(folder / "config.json", config)
        files.append("config.json")
    if checksums:
        write_manifest(folder, digests)
        files.append(MANIFEST_NAME)
    return sorted(set(files))


def run_merge(
    plan: MergePlan,
    output: Path,
    *,
    device: str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
    checksums: bool = True,
    model_card: str | None = None,
    on_shard: ShardDone | None = None,
    before_publish: Callable[[Path, list[str]], None] | None = None,
) -> MergeResult:
    """``before_publish(folder, files)`` runs on the complete output before it is renamed
    into place (``--push-to-hub`` commits there): should it fail, nothing is published."""
    start = time.perf_counter()
    with OutputDir(output, overwrite) as out:
        written, digests, device = write_shards(
            plan, plan.shards, out.path, device=device, progress=progress, checksums=checksums,
            on_shard=on_shard,
        )  # fmt: skip
        files = finish_output(plan, out.path, digests, checksums, model_card)
        if before_publish:
            before_publish(out.path, files)
    return merge_result(plan, output, files, device, time.perf_counter() - start, written)


def merge_result(
    plan: MergePlan, output: Path, files: list[str], device: str, seconds: float, written: int
) -> MergeResult:
    return MergeResult(
        output=Path(output),
        files=files,
        counts=plan.counts(),
        rule=plan.rule,
        device=device,
        seconds=seconds,
        bytes_written=written,
        untied=plan.untied,
        config_updates=plan.config_updates,
        warnings=plan.warnings,
        tokenizer_from=plan.side_files.to_json() if plan.side_files is not None else None,
        renames=plan.renames(),
    )
