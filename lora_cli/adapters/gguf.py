"""GGUF LoRA (llama.cpp) adapters → the canonical Adapter, in HF names.

llama.cpp's ``convert_lora_to_gguf.py`` writes ``<gguf base name>.lora_a`` /
``.lora_b`` (``blk.0.attn_q.weight.lora_a``) in PEFT orientation (numpy ``A (r, in)``,
``B (out, r)``), except ``token_embd`` whose ``lora_a`` is transposed; one
``adapter.lora.alpha`` for the file and a per-tensor rank (llama.cpp's scale is
``alpha / rank``). For Llama-family architectures it runs the base model's RoPE row
permutation of Q and K on ``lora_b``, so those rows are permuted back here, which
needs the head counts from the base's ``config.json``. GGUF names are mapped back with
the ``gguf`` package's ``TensorNameMap`` (several HF spellings per GGUF name: the one
the base checkpoint holds wins). The ``gguf`` package is an optional extra
(``lora-cli[gguf]``), imported only when a GGUF file is met. See
docs/lora-formats.md §4.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_cli.adapters.config_checks import finite_scale
from lora_cli.adapters.gguf_header import walk_header
from lora_cli.adapters.peft import PREFIX, Adapter, LoraModule, adapter_warnings
from lora_cli.errors import FormatError
from lora_cli.io.layout import read_json
from lora_cli.io.reader import TensorInfo
from lora_cli.sources.view import Derived, ViewSource, plain, transposed

if TYPE_CHECKING:
    import torch

    from lora_cli.io.reader import TensorSource

GGUF_MAGIC = b"GGUF"
# HF architectures llama.cpp's converter handles the way this module reproduces:
# HF class → (GGUF architecture, RoPE-permutes Q/K rows).
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}
PERMUTING = {gguf_arch for gguf_arch, permutes in ARCHITECTURES.values() if permutes}
FIX_GGUF = "re-convert the adapter with llama.cpp's convert_lora_to_gguf.py"
INSTALL_HINT = "install the optional extra: pip install 'lora-cli[gguf]'"


def gguf_module() -> Any:
    try:
        import gguf
    except ImportError:
        raise FormatError("GGUF support needs the 'gguf' package", INSTALL_HINT) from None
    return gguf


def is_gguf_adapter(path: Path) -> bool:
    """A GGUF file (magic bytes); whether it is a LoRA is checked when it is loaded."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def base_config(base: TensorSource | None) -> dict[str, Any] | None:
    if base is None or not (base.root / "config.json").is_file():
        return None
    config = read_json(base.root / "config.json", "model config")
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def head_counts(config: dict[str, Any]) -> tuple[int, int]:
    n_head = int(config["num_attention_heads"])
    return n_head, int(config.get("num_key_value_heads") or n_head)


def rope_permute(b: torch.Tensor, n_head: int, inverse: bool = False) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute`` of rows (``inverse``: its undoing)."""
    out, rest = b.shape[0], b.shape[1:]
    half = out // n_head // 2
    if inverse:
        return b.reshape(n_head, half, 2, *rest).swapaxes(1, 2).reshape(b.shape)
    return b.reshape(n_head, 2, half, *rest).swapaxes(1, 2).reshape(b.shape)


class GgufTensors:
    """The tensors of a GGUF file by name, read one at a time (memory-mapped)."""

    DTYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16"}

    def __init__(self, path: Path) -> None:
        gguf = gguf_module()
        sizes = {int(k): (int(b), int(n)) for k, (b, n) in gguf.GGML_QUANT_SIZES.items()}
        self.kv = walk_header(path, sizes)  # every count and length checked against the file
        try:
            self.reader = gguf.GGUFReader(path)
        except (ValueError, OSError, KeyError) as exc:
            raise FormatError(f"{path}: not a readable GGUF file ({exc})") from None
        self.path = path
        self.format = "gguf"
        self.infos: dict[str, TensorInfo] = {}
        self._tensors = {}
        for t in self.reader.tensors:
            kind = t.tensor_type.name
            if kind not in self.DTYPES:
                raise FormatError(
                    f"{path}: tensor {t.name!r} is {kind}",
                    "only F32, F16 and BF16 GGUF LoRAs are read; convert with --outtype f32",
                )
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            self.infos[t.name] = TensorInfo(t.name, self.DTYPES[kind], shape, int(t.n_bytes), path)
            self._tensors[t.name] = t

    def field(self, key: str) -> Any:
        return self.kv.get(key)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        import numpy as np
        import torch

        t = self._tensors[name]
        data = np.array(t.data)
        if self.infos[name].dtype == "BF16":
            data = torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
        else:
            data = torch.from_numpy(data)
        data = data.reshape(self.infos[name].shape)
        return data[rows[0] : rows[1]] if rows else data

    def close(self) -> None:
        mm = getattr(self.reader, "data", None)
        if mm is not None and hasattr(mm, "_mmap"):
            mm._mmap.close()


def hf_names(arch: str, blocks: Iterable[int]) -> dict[str, list[str]]:
    """GGUF tensor base name → the HF names ``TensorNameMap`` lists for it, in its order.

    Only the block indices present are mapped: ``TensorNameMap(arch, n)`` builds every
    block below ``n``, so a file naming ``blk.1000000`` would build a million blocks'
    names. This runs the package's own per-block loop for the given indices only."""
    gguf = gguf_module()
    arch_enum = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), None)
    if arch_enum is None:
        raise FormatError(f"GGUF architecture {arch!r} is unknown to the installed gguf package")
    table = gguf.TensorNameMap(arch_enum, 0)
    known = gguf.MODEL_TENSORS[arch_enum]
    for bid in sorted(blocks):  # TensorNameMap.__init__'s block loop, for these blocks
        for tensor, keys in table.block_mappings_cfg.items():
            if tensor not in known:
                continue
            tensor_name = gguf.TENSOR_NAMES[tensor].format(bid=bid)
            table.mapping[tensor_name] = (tensor, tensor_name)
            for key in keys:
                table.mapping[key.format(bid=bid)] = (tensor, tensor_name)
    out: dict[str, list[str]] = {}
    for hf, (_, gguf_name) in table.mapping.items():
        if hf != gguf_name:
            out.setdefault(gguf_name, []).append(hf)
    return out


def _pick(candidates: list[str], base_names: set[str] | None) -> str | None:
    if base_names is not None:
        for c in candidates:
            if c + ".weight" in base_names:
                return c
        for c in candidates:  # a VLM wrapper or another prefix: the resolver will map it
            if any(n.endswith("." + c + ".weight") for n in base_names):
                return c
    for c in candidates:
        if c.startswith(("model.", "lm_head")):
            return c
    return candidates[0] if candidates else None


def load_gguf_adapter(path: Path, base: TensorSource | None = None) -> Adapter:
    """Read a GGUF LoRA as a canonical Adapter in HF names (against ``base`` when given)."""
    tensors = GgufTensors(Path(path))
    try:
        return _build(Path(path), tensors, base)
    except BaseException:
        tensors.close()
        raise


def _build(path: Path, tensors: GgufTensors, base: TensorSource | None) -> Adapter:
    gtype = tensors.field("general.type")
    if gtype != "adapter" or tensors.field("adapter.type") != "lora":
        shown = gtype if isinstance(gtype, str) and gtype else "model"
        raise FormatError(
            f"{path}: a GGUF {shown!r} file, not a LoRA adapter "
            "(general.type must be 'adapter', adapter.type 'lora')"
        )
    arch = tensors.field("general.architecture")
    if not isinstance(arch, str):
        raise FormatError(f"{path}: general.architecture: must be a string", FIX_GGUF)
    alpha = tensors.field("adapter.lora.alpha")
    alpha = 0.0 if alpha is None else finite_scale(path, "adapter.lora.alpha", alpha, FIX_GGUF)
    pairs: dict[str, dict[str, str]] = {}
    non_adapter = []
    blocks: set[int] = set()
    for name in tensors.infos:
        stem, _, leaf = name.rpartition(".")
        if leaf in ("lora_a", "lora_b"):
            pairs.setdefault(stem, {})[leaf] = name
            if stem.startswith("blk."):
                index = stem.split(".")[1]
                if not index.isdecimal() or len(index) > 9:
                    raise FormatError(
                        f"{path}: tensor {name!r}: block index {index!r} is not a number",
                        FIX_GGUF,
                    )
                blocks.add(int(index))
        else:
            non_adapter.append(name)
    names = hf_names(arch, blocks)
    base_names = set(base.names()) if base is not None else None
    config = base_config(base)
    permute = arch in PERMUTING
    heads = head_counts(config) if permute and config else None
    recipes: list[Derived] = []
    modules: dict[str, LoraModule] = {}
    for stem, parts in sorted(pairs.items()):
        if set(parts) != {"lora_a", "lora_b"}:
            raise FormatError(f"{path}: {stem} has only {', '.join(parts)}")
        a, b = tensors.infos[parts["lora_a"]], tensors.infos[parts["lora_b"]]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise FormatError(
                f"{path}: {stem} has {len(a.shape)}-D factors (stacked MoE experts are not "
                "supported)"
            )
        gguf_base = stem[: -len(".weight")] if stem.endswith(".weight") else stem
        hf = _pick(names.get(gguf_base, []), base_names)
        if hf is None:
            raise FormatError(f"{path}: no HF name for GGUF tensor {stem!r} ({arch})")
        r = b.shape[1]
        scale = alpha / r if alpha else 1.0
        m = LoraModule(hf, r=r, alpha=scale * r, scale=scale)
        if gguf_base == "token_embd":  # lora_a is stored transposed: (num, r)
            m.parts["lora_embedding_A"] = _add(
                recipes, f"{PREFIX}{hf}.lora_embedding_A", a, a.shape[::-1], transposed(a.name)
            )
            m.parts["lora_embedding_B"] = _add(
                recipes, f"{PREFIX}{hf}.lora_embedding_B", b, b.shape, plain(b.name)
            )
        else:
            m.parts["lora_A.weight"] = _add(
                recipes, f"{PREFIX}{hf}.lora_A.weight", a, a.shape, plain(a.name)
            )
            n = None
            if heads and gguf_base.endswith(("attn_q", "attn_k")):
                n = heads[0] if gguf_base.endswith("attn_q") else heads[1]
            m.parts["lora_B.weight"] = _add(
                recipes, f"{PREFIX}{hf}.lora_B.weight", b, b.shape, _unpermuted(b.name, n)
            )
        modules[hf] = m
    from lora_cli.adapters.mlx import peft_targets

    targets, layers = peft_targets(list(modules), 0)
    ranks = sorted({m.r for m in modules.values()})
    native = {
        "architecture": arch,
        "alpha": alpha,
        "ranks": ranks,
        "rope_rows_unpermuted": bool(heads),
        "requires_base": permute and not heads,
    }
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base.root) if base is not None else None,
        "r": ranks[0] if ranks else 0,
        "lora_alpha": alpha if alpha else (ranks[0] if ranks else 0),
        "target_modules": targets,
        "layers_to_transform": layers,
        "layers_pattern": "layers" if layers else None,
        "use_dora": False,
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
    }
    source = ViewSource.derived(tensors, recipes, root=path.parent, file=path, fmt="gguf")
    adapter = Adapter(
        root=path.parent,
        weights_file=path,
        config_path=path,
        config=peft_config,
        source=source,
        modules=modules,
        replacements={},
        token_rows={},
        non_adapter=non_adapter,
        key_renames={},
        producer="llama.cpp",
        format="gguf",
        native=native,
    )
    adapter.warnings = adapter_warnings(adapter)
    if non_adapter:
        adapter.warnings.append(
            f"{len(non_adapter)} non-LoRA tensors (e.g. {non_adapter[0]}); llama.cpp ignores "
            "them and so do merge and convert"
        )
    if permute and not heads:
        adapter.warnings.append(
            f"{arch}: Q/K lora_b rows are RoPE-permuted; pass the base model to read them back"
        )
    return adapter


def _add(recipes: list[Derived], name: str, info: TensorInfo, shape: Any, compute: Any) -> str:
    recipes.append(Derived(name, info.dtype, tuple(shape), compute))
    return name


def _unpermuted(key: str, n_head: int | None) -> Any:
    if n_head is None:
        return plain(key)
    return lambda read: rope_permute(read(key), n_head, inverse=True)
