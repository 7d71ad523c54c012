"""``convert --to gguf``: a canonical Adapter → a llama.cpp GGUF LoRA file.

Reproduces what llama.cpp's ``convert_lora_to_gguf.py`` writes (f32 factors, GGUF
names from ``TensorNameMap``, Llama Q/K ``lora_b`` rows RoPE-permuted, the embedding's
``lora_a`` transposed, one ``adapter.lora.alpha``), and goes beyond it where the script
is wrong: llama.cpp applies ``alpha / rank`` per tensor, so a module whose PEFT scale
differs from that (rsLoRA's ``alpha / √r``, ``alpha_pattern``) gets the ratio folded
into its ``lora_b``, making the effect exact. What llama.cpp cannot load (full
embedding or lm_head weights, a LoRA on a tied lm_head, DoRA, lora_bias, trainable
tokens) is refused with the reason.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from lora_cli.adapters.export import Exported, Progress, common_checks, refuse
from lora_cli.adapters.gguf import (
    ARCHITECTURES,
    base_config,
    gguf_module,
    head_counts,
    rope_permute,
)
from lora_cli.adapters.peft import Adapter
from lora_cli.errors import FormatError, UsageError
from lora_cli.io.layout import OUTPUT_EMBEDDING
from lora_cli.io.reader import TensorSource
from lora_cli.io.writer import TMP_MARK, remove_stale_temporaries
from lora_cli.sources.model_config import tie_word_embeddings


def _saved_base_copies(adapter: Adapter, base: TensorSource) -> list[str]:
    """Replacements that are PEFT's auto-saved copies of a LoRA-wrapped embedding
    (``<module>.base_layer.weight``, same shape as the base): llama.cpp's converter skips
    them, and so does this writer."""
    src = adapter.source
    return [
        name
        for name, key in adapter.replacements.items()
        if ".base_layer." in key and name in base and src.info(key).shape == base.info(name).shape
    ]


def _problems(adapter: Adapter, tied: bool, skipped: list[str]) -> list[str]:
    out = []
    for m in adapter.modules.values():
        if m.has_dora:
            out.append(f"{m.path}: DoRA has no GGUF LoRA form (llama.cpp applies plain LoRA)")
        elif "lora_B.bias" in m.parts:
            out.append(f"{m.path}: lora_bias has no GGUF LoRA form")
        elif m.path.endswith("lm_head") and tied:
            out.append(
                "a LoRA on lm_head while the base ties it to the embedding: llama.cpp has no "
                "separate output tensor to apply it to (llama.cpp issue #9065)"
            )
    for name in adapter.replacements:
        if name not in skipped:
            out.append(
                f"full tensor {name} (modules_to_save or a resized vocabulary): llama.cpp "
                "loads no full weights from a LoRA (llama.cpp PR #9948); merge it with "
                "`lora merge`"
            )
    if adapter.token_rows:
        out.append("trainable tokens have no GGUF LoRA form")
    if adapter.config.get("target_parameters"):
        out.append("target_parameters (fused MoE expert) LoRAs are not supported for GGUF")
    return out


def write_gguf(
    adapter: Adapter, base: TensorSource, output: Path, overwrite: bool, progress: Progress | None
) -> Exported:
    gguf = gguf_module()
    import numpy as np

    common_checks(adapter, "GGUF")
    config = base_config(base)
    if config is None:
        raise UsageError(f"{base.root}: no config.json", "--base must be the HF model folder")
    arch_class = (config.get("architectures") or ["?"])[0]
    if arch_class not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise FormatError(
            f"{adapter.root}: cannot convert to GGUF for {arch_class}: supported are {known}"
        )
    arch, permutes = ARCHITECTURES[arch_class]
    tied = bool(tie_word_embeddings(config)) and OUTPUT_EMBEDDING not in base
    skipped = _saved_base_copies(adapter, base)
    refuse(adapter, "GGUF", _problems(adapter, tied, skipped))

    from lora_cli.merge.plan import build_plan

    plan = build_plan(base, adapter)  # the merge preflight: every target must fit the base
    targets = {op.module.path: act.name for act in plan.actions() for op in act.loras}
    blocks = int(config.get("num_hidden_layers") or 0)
    table = gguf.TensorNameMap(
        next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), blocks
    )
    n_head, n_kv = head_counts(config) if permutes else (0, 0)
    modules = list(adapter.modules.values())
    alpha = float(Counter(m.r * m.scale for m in modules).most_common(1)[0][0])
    alpha_cfg = adapter.config.get("lora_alpha")
    if adapter.format == "peft" and isinstance(alpha_cfg, (int, float)) and alpha_cfg > 0:
        alpha = float(alpha_cfg)  # what the llama.cpp script writes
    planned: list[tuple[str, Any]] = []
    folded = 0
    for m in sorted(modules, key=lambda m: targets[m.path]):
        hf_name = targets[m.path]
        if hf_name == OUTPUT_EMBEDDING and hf_name not in base:
            raise FormatError(f"{adapter.root}: lm_head LoRA on a tied base")
        stem = table.get_name(hf_name.replace("language_model.", ""), try_suffixes=(".weight",))
        if stem is None:
            raise FormatError(f"{adapter.root}: {hf_name} has no {arch} GGUF tensor name")
        factor = m.scale / (alpha / m.r)
        folded += factor != 1.0
        if m.is_embedding:
            a_key, b_key = m.parts["lora_embedding_A"], m.parts["lora_embedding_B"]
            planned.append((f"{stem}.lora_a", _f32(a_key, transpose=True)))
            planned.append((f"{stem}.lora_b", _f32(b_key, factor=factor)))
            continue
        n = None
        if permutes and stem.endswith(("attn_q.weight", "attn_k.weight")):
            n = n_head if stem.endswith("attn_q.weight") else n_kv
        planned.append((f"{stem}.lora_a", _f32(m.parts["lora_A.weight"])))
        planned.append((f"{stem}.lora_b", _f32(m.parts["lora_B.weight"], factor=factor, heads=n)))

    read = adapter.source.read
    output = Path(output).absolute()
    remove_stale_temporaries(output)
    tmp = output.parent / f".{output.name}{TMP_MARK}{os.getpid()}"
    if output.exists() and not overwrite:
        raise UsageError(f"{output} already exists", "pass --overwrite to replace it")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        shapes = {}
        for name, compute in planned:  # shapes from headers: nothing is read yet
            shapes[name] = compute.shape(adapter)
            writer.add_tensor_info(name, shapes[name], np.float32, 4 * _numel(shapes[name]))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = 0
        for name, compute in planned:
            value = compute(read).numpy()
            writer.write_tensor_data(value)
            total += value.nbytes
            if progress:
                progress(value.nbytes, name)
        writer.close()
        _verify(gguf, tmp, planned, read)
        os.replace(tmp, output)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    notes = [f"GGUF {arch}, alpha {alpha:g}, {len(modules)} modules, f32"]
    if folded:
        notes.append(
            f"{folded} modules' scales differ from alpha/rank (rsLoRA or alpha_pattern): "
            "folded into lora_b so llama.cpp applies them exactly"
        )
    if skipped:
        notes.append(f"skipped PEFT's saved copies of the base layers: {', '.join(skipped)}")
    if permutes:
        notes.append("Q/K lora_b rows RoPE-permuted as llama.cpp's converter does")
    return Exported([output.name], len(planned), total, notes)


def _verify(gguf: Any, path: Path, planned: list[tuple[str, Any]], read: Any) -> None:
    """Re-read the written file and compare every tensor bit for bit with its source."""
    import numpy as np

    reader = gguf.GGUFReader(path)
    written = {t.name: t for t in reader.tensors}
    for name, compute in planned:
        want = compute(read).numpy()
        got = np.asarray(written[name].data) if name in written else None
        if (
            got is None
            or got.shape != want.shape
            or not np.array_equal(got.view(np.uint32), want.view(np.uint32))
        ):
            raise FormatError(
                f"{path}: tensor {name!r} does not match its source after writing",
                "the disk or the source file changed during conversion; rerun",
            )
    mm = getattr(reader, "data", None)
    if mm is not None and hasattr(mm, "_mmap"):
        mm._mmap.close()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class _f32:  # noqa: N801  (a recipe, used like a function)
    """One factor as f32 numpy order: optionally transposed, scaled, Q/K row-permuted."""

    def __init__(
        self, key: str, *, transpose: bool = False, factor: float = 1.0, heads: int | None = None
    ) -> None:
        self.key, self.transpose, self.factor, self.heads = key, transpose, factor, heads

    def shape(self, adapter: Adapter) -> tuple[int, ...]:
        shape = adapter.source.info(self.key).shape
        return tuple(shape[::-1]) if self.transpose else tuple(shape)

    def __call__(self, read: Any) -> Any:
        import torch

        t = read(self.key).to(torch.float32)
        if self.factor != 1.0:
            t = t * self.factor
        if self.heads:
            t = rope_permute(t, self.heads)
        return (t.T if self.transpose else t).contiguous()
