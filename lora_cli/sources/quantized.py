"""Quantized base checkpoints seen as ordinary tensors: detection per tensor, and a
``TensorSource`` that presents chosen quantized weights as the bf16 tensors their
producer's dequantizer gives (so name resolution, planning and the merge math work
unchanged), while every other tensor (scales included) stays raw and is copied as bytes.

Detection reads headers only and decides per tensor, never from the config's lists
(docs/quantized-bases.md §5): a scale may sit in another shard, and configs' skip-lists
are incomplete. What cannot be decoded yet (NVFP4, AWQ/GPTQ ``qweight``,
bitsandbytes) is recorded so that a merge touching it is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lora_cli.errors import FormatError
from lora_cli.io.dtypes import to_torch
from lora_cli.io.reader import TensorInfo, TensorSource
from lora_cli.numerics import all_finite

if TYPE_CHECKING:
    import torch

FP8_BLOCK = "fp8-block"  # DeepSeek / Qwen3 / FineGrainedFP8: weight + weight_scale_inv
CT_PACKED = "ct-pack-quantized"  # compressed-tensors INT4: weight_packed/scale/shape
CT_FLOAT = "ct-float-quantized"  # compressed-tensors FP8 (or int8): weight + weight_scale
MXFP4 = "mxfp4"  # gpt-oss: <param>_blocks + <param>_scales

BNB_MARKERS = (".absmax", ".quant_map", ".SCB", ".quant_state.bitsandbytes__nf4")


@dataclass
class QuantizedTensor:
    """One quantized weight: its bf16 name and shape, and the raw tensors that encode it."""

    name: str  # the name a bf16 checkpoint gives it (``X.weight``, ``…experts.gate_up_proj``)
    scheme: str
    shape: tuple[int, ...]  # dequantized shape
    parts: dict[str, str]  # role (weight, scale, zero_point, g_idx, shape) → raw tensor name
    block: tuple[int, int] | None = None
    pow2: bool = False  # FP8 scales are powers of two: re-quantize them so

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")

    @property
    def primary(self) -> str:
        return self.parts["weight"]

    @property
    def reads_rows(self) -> bool:
        """Whether ``decode(rows=…)`` reads only those rows' bytes and scales (rows of the
        dequantized first dimension: output rows, or experts for MXFP4)."""
        return "zero_point" not in self.parts and "g_idx" not in self.parts

    def scale_rows(self, rows: tuple[int, int], raw: TensorSource) -> tuple[int, int] | None:
        """The rows of the scale tensor that weight rows ``rows`` use (None: all of it)."""
        if self.block is not None:
            return rows[0] // self.block[0], -(-rows[1] // self.block[0])
        shape = raw.info(self.parts["scale"]).shape
        if self.scheme == CT_FLOAT and (len(shape) < 2 or shape[0] != self.shape[0]):
            return None  # one scale for the whole tensor
        return rows

    def read_parts(
        self, raw: TensorSource, rows: tuple[int, int] | None = None, *, pin: bool = False
    ) -> dict[str, torch.Tensor]:
        """The raw tensors that decode rows ``rows`` (all: None) of this weight."""
        if rows is not None and not self.reads_rows:
            raise ValueError(f"{self.name}: row blocks need a symmetric, in-order encoding")
        parts = {"weight": raw.read(self.parts["weight"], rows=rows, pin=pin)}
        scale_rows = self.scale_rows(rows, raw) if rows is not None else None
        parts["scale"] = raw.read(self.parts["scale"], rows=scale_rows, pin=pin)
        check_scales(raw, self.parts["scale"], parts["scale"], self.scheme)
        for role in ("zero_point", "g_idx"):
            if role in self.parts:
                parts[role] = raw.read(self.parts[role])
        return parts

    def decode_parts(self, parts: dict[str, torch.Tensor], first_row: int = 0) -> torch.Tensor:
        """The bf16 value of rows ``first_row…`` from their raw tensors, on their device: bit
        for bit what the producer's own dequantizer returns (pure: no I/O)."""
        import torch

        from lora_cli.io import quant

        bf16 = torch.bfloat16
        weight, scale = parts["weight"], parts["scale"]
        if self.scheme == FP8_BLOCK:
            assert self.block is not None
            return quant.fp8_block_dequant(weight, scale, self.block, bf16, first_row)
        if self.scheme == MXFP4:
            return quant.mxfp4_dequant(weight, scale, bf16, transpose=True)
        zp, g_idx = parts.get("zero_point"), parts.get("g_idx")
        if self.scheme == CT_PACKED:
            out_features, cols = self.shape
            weight = quant.unpack_int4(weight, cols)
            if zp is not None:  # packed along the output dim
                zp = quant.unpack_int4(zp.T.contiguous(), out_features).T
        return quant.ct_dequant(
            weight, scale, zp, block=self.block, g_idx=g_idx, out_dtype=bf16, first_row=first_row
        )

    def decode(
        self, raw: TensorSource, rows: tuple[int, int] | None = None, device: str | None = None
    ) -> torch.Tensor:
        """The bf16 tensor (or rows of it), decoded on ``device`` (default: the CPU), from
        pinned host buffers when that is a GPU."""
        if rows is not None and not self.reads_rows:
            return self.decode(raw, device=device)[rows[0] : rows[1]].contiguous()
        cuda = device is not None and device.startswith("cuda")
        parts = self.read_parts(raw, rows, pin=cuda)
        if device is not None:
            parts = {k: v.to(device, non_blocking=cuda) for k, v in parts.items()}
        return self.decode_parts(parts, rows[0] if rows else 0)

    def row_unit(self, raw: TensorSource) -> int | None:
        """Rows that ``encode`` can re-quantize apart from the rest (a block of a multiple
        of them from a multiple of them gives the bytes the whole tensor would), or None
        when the scale depends on the whole tensor."""
        if not self.reads_rows or self.requant_problem(raw):
            return None
        if self.block is not None:
            return self.block[0]
        return None if self.scale_rows((0, 1), raw) is None else 1

    def requant_problem(self, raw: TensorSource) -> str | None:
        """Why ``encode`` cannot re-quantize this weight (checked before anything is written)."""
        if self.scheme in (FP8_BLOCK, MXFP4):
            return None
        if "zero_point" in self.parts or "g_idx" in self.parts:
            return "asymmetric or act-order compressed-tensors weights"
        scale = raw.info(self.parts["scale"]).shape
        if self.scheme == CT_PACKED:
            if len(scale) != 2 or self.shape[1] % scale[1]:
                return f"pack-quantized weights with a {list(scale)} scale"
            return None
        weight_dtype = raw.info(self.parts["weight"]).dtype
        if weight_dtype != "F8_E4M3":
            return f"{weight_dtype} compressed-tensors weights"
        if self.block is None and len(scale) == 2 and scale[1] != 1:
            return "group-strategy FP8 weights"
        return None

    def encode(self, merged: torch.Tensor, raw: TensorSource) -> dict[str, torch.Tensor]:
        """Fresh raw tensors for ``merged`` (bf16, dequantized shape, or rows of it from a
        multiple of ``row_unit``) by the producer's rules, with the scale dtype and grid
        shape read from the base; on ``merged``'s device. ``shape`` (pack-quantized) is
        the base's own tensor."""
        from lora_cli.io import quant

        scale_info = raw.info(self.parts["scale"])
        scale_dtype = to_torch(scale_info.dtype)
        if self.scheme == FP8_BLOCK:
            assert self.block is not None
            q, s = quant.fp8_block_quant(merged, self.block, scale_dtype, pow2=self.pow2)
            return {"weight": q, "scale": s}
        if self.scheme == MXFP4:
            blocks, scales = quant.mxfp4_quant(merged.transpose(1, 2))
            return {"weight": blocks, "scale": scales}
        problem = self.requant_problem(raw)
        assert problem is None, problem  # the planner refused it already
        if self.scheme == CT_PACKED:
            group = self.shape[1] // scale_info.shape[1]
            q, s = quant.ct_int_quant(merged, group, scale_dtype)
            return {
                "weight": quant.pack_int4(q),
                "scale": s,
                "shape": raw.read(self.parts["shape"]),
            }
        shape = tuple(scale_info.shape)
        q, s = quant.ct_float_quant(merged, shape, self.block, scale_dtype)
        return {"weight": q, "scale": s if len(s.shape) == 2 else s.reshape(shape)}


@dataclass
class QuantScheme:
    """What a base checkpoint holds, per tensor."""

    method: str | None  # quantization_config.quant_method, if any
    tensors: dict[str, QuantizedTensor] = field(default_factory=dict)  # by bf16 name
    unsupported: dict[str, tuple[str, str]] = field(default_factory=dict)  # module → (fmt, key)
    whole: tuple[str, str] | None = None  # a format that rules out any merge (bitsandbytes)

    def families(self) -> dict[str, dict[str, Any]]:
        """Tensors grouped by scheme and layer-independent name (for ``inspect``)."""
        import re

        out: dict[str, dict[str, Any]] = {}
        for qt in self.tensors.values():
            family = re.sub(r"\.\d+\.", ".N.", qt.name)
            key = f"{qt.scheme} {family}"
            entry = out.setdefault(
                key,
                {
                    "scheme": qt.scheme,
                    "family": family,
                    "tensors": 0,
                    "block": list(qt.block) if qt.block else None,
                    "pow2_scales": qt.pow2,
                },
            )
            entry["tensors"] += 1
        for module, (fmt, key) in self.unsupported.items():
            family = re.sub(r"\.\d+\.", ".N.", module)
            entry = out.setdefault(
                f"{fmt} {family}", {"scheme": fmt, "family": family, "tensors": 0, "example": key}
            )
            entry["tensors"] += 1
        return out


# E8M0 (MXFP4 and ue8m0 scales) encodes NaN as 0xFF; every other byte is a power of two.
E8M0_NAN = 0xFF
# A quantization block wider than 2¹⁶ would be one scale for a whole matrix row of the
# largest models (hidden sizes ≤ 2¹⁵); real blocks are 32–128.
MAX_BLOCK = 1 << 16


def _block_pair(value: Any, field: str, root: Any) -> tuple[int, int] | None:
    """A ``[rows, cols]`` quantization block from the config, type- and range-checked."""
    if value is None:
        return None
    ok = (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and all(0 < v <= MAX_BLOCK for v in value)
    )
    if not ok:
        raise FormatError(
            f"{root}/config.json: quantization_config.{field}: {value!r} is not two "
            f"positive integers (at most {MAX_BLOCK})",
            "fix the base's config.json (e.g. [128, 128])",
        )
    return int(value[0]), int(value[1])


def _config_block(qc: dict[str, Any], root: Any = ".") -> tuple[int, int] | None:
    block = _block_pair(qc.get("weight_block_size"), "weight_block_size", root)
    if block is not None:
        return block
    groups = qc.get("config_groups") or {}
    for name, group in groups.items() if isinstance(groups, dict) else []:
        weights = (group or {}).get("weights") if isinstance(group, dict) else None
        if isinstance(weights, dict) and weights.get("block_structure") is not None:
            field = f"config_groups.{name}.weights.block_structure"
            return _block_pair(weights["block_structure"], field, root)
    return None


def check_scales(raw: TensorSource, name: str, scale: torch.Tensor, scheme: str) -> None:
    """Refuse a quantization scale tensor holding NaN/Inf (E8M0: the NaN byte 0xFF) before
    it multiplies a weight: the merge would write NaN/Inf weights from it."""
    if scale.is_floating_point():
        finite = all_finite(scale)
    else:
        finite = scheme != MXFP4 or not bool((scale == E8M0_NAN).any())
    if not finite:
        info = raw.info(name)
        raise FormatError(
            f"{info.file}: tensor {name!r}: quantization scales hold NaN/Inf",
            "the quantized base is corrupt; re-download it",
        )


def _fits_grid(shape: tuple[int, ...], grid: tuple[int, ...], block: tuple[int, int]) -> bool:
    return len(shape) == 2 and tuple(grid) == (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def detect(
    source: TensorSource, config: dict[str, Any] | None, *, values: bool = True
) -> QuantScheme:
    """Classify every quantized tensor of ``source`` from its headers. With ``values`` (what a
    merge needs) the small ``weight_shape`` tensors and FP8 scales are read too, for the exact
    dequantized shape and the power-of-two test; without, ``inspect`` stays header-only."""
    qc = (config or {}).get("quantization_config") or {}
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    scheme = QuantScheme(method=method)
    names = source.infos
    if method == "bitsandbytes" or any(n.endswith(BNB_MARKERS) for n in names):
        key = next((n for n in names if n.endswith(BNB_MARKERS)), "quantization_config")
        scheme.whole = ("bitsandbytes", key)
        return scheme
    block_cfg = _config_block(qc, source.root) if isinstance(qc, dict) else None
    ct_format = str(qc.get("format", "")) if method == "compressed-tensors" else ""
    for name, info in names.items():
        if name.endswith(".qweight"):
            scheme.unsupported[name.removesuffix(".qweight")] = ("AWQ/GPTQ qweight", name)
        elif name.endswith((".weight_global_scale", ".weight_scale_2")):
            scheme.unsupported[name.rsplit(".", 1)[0]] = ("NVFP4", name)
        elif name.endswith(".weight_packed") and ("fp4" in ct_format or info.dtype == "U8"):
            fmt = "NVFP4" if "nvfp4" in ct_format else f"FP4 ({ct_format or 'packed U8'})"
            scheme.unsupported.setdefault(name.removesuffix(".weight_packed"), (fmt, name))
        elif name.endswith(".weight") and f"{name}_scale_inv" in names:
            scale = names[f"{name}_scale_inv"]
            block = block_cfg or (128, 128)
            if info.dtype != "F8_E4M3" or not _fits_grid(info.shape, scale.shape, block):
                scheme.unsupported[name.removesuffix(".weight")] = (
                    f"{info.dtype} weight with a {list(scale.shape)} scale grid",
                    name,
                )
                continue
            scheme.tensors[name] = QuantizedTensor(
                name,
                FP8_BLOCK,
                info.shape,
                {"weight": name, "scale": f"{name}_scale_inv"},
                block=block,
                pow2=scale.dtype == "F8_E8M0" or qc.get("scale_fmt") == "ue8m0",
            )
        elif name.endswith(".weight_packed") and method == "compressed-tensors":
            module = name.removesuffix(".weight_packed")
            scheme.tensors[f"{module}.weight"] = _ct_packed(source, module, values)
        elif (
            name.endswith(".weight")
            and f"{name}_scale" in names
            and info.dtype in ("F8_E4M3", "I8")
            and method == "compressed-tensors"
        ):
            module = name.removesuffix(".weight")
            parts = {"weight": name, "scale": f"{name}_scale"}
            _optional(parts, names, module)
            scale = names[f"{name}_scale"].shape
            # tensor (1,), channel (out, 1), group (out, in/g) or block (⌈out/b0⌉, ⌈in/b1⌉)
            block = None
            if len(scale) == 2 and scale[0] != info.shape[0]:
                block = block_cfg or (128, 128)
            scheme.tensors[name] = QuantizedTensor(name, CT_FLOAT, info.shape, parts, block=block)
        elif name.endswith("_blocks") and f"{name[:-7]}_scales" in names and info.dtype == "U8":
            param = name[: -len("_blocks")]
            scales = names[f"{param}_scales"].shape
            if len(info.shape) != 4 or info.shape[3] != 16 or tuple(scales) != info.shape[:3]:
                raise FormatError(
                    f"{info.file}: tensor {name!r}: MXFP4 blocks {list(info.shape)} with scales "
                    f"{list(scales)} (expected (E, out, G, 16) blocks and (E, out, G) scales)",
                    "the quantized base is corrupt; re-download it",
                )
            e, out, groups, _ = info.shape
            scheme.tensors[param] = QuantizedTensor(
                param, MXFP4, (e, groups * 32, out), {"weight": name, "scale": f"{param}_scales"}
            )
        elif info.dtype in ("F8_E4M3", "F4") and name.endswith(".weight"):
            fmt = f"{info.dtype} weight ({method or 'no quantization_config'}, no known scale)"
            scheme.unsupported.setdefault(name.removesuffix(".weight"), (fmt, name))
    if values:
        _check_pow2(source, scheme)
    return scheme


def _optional(parts: dict[str, str], names: dict[str, TensorInfo], module: str) -> None:
    for role in ("zero_point", "g_idx"):
        if f"{module}.weight_{role}" in names:
            parts[role] = f"{module}.weight_{role}"


def _ct_packed(source: TensorSource, module: str, values: bool) -> QuantizedTensor:
    parts = {"weight": f"{module}.weight_packed", "scale": f"{module}.weight_scale"}
    if f"{module}.weight_shape" not in source or parts["scale"] not in source:
        raise FormatError(
            f"{source.root}: {module}.weight_packed has no weight_scale/weight_shape",
            "the compressed-tensors checkpoint is incomplete",
        )
    parts["shape"] = f"{module}.weight_shape"
    _optional(parts, source.infos, module)
    packed = source.info(parts["weight"])
    if len(packed.shape) != 2:
        raise FormatError(
            f"{packed.file}: tensor {parts['weight']!r}: packed weight of shape "
            f"{list(packed.shape)} is not 2-D",
            "the compressed-tensors checkpoint is corrupt",
        )
    if not values:  # header only: the packed width bounds the column count
        return QuantizedTensor(
            f"{module}.weight", CT_PACKED, (packed.shape[0], packed.shape[1] * 8), parts
        )
    shape = source.read(parts["shape"]).tolist()
    words = packed.shape[1]
    fits = (
        isinstance(shape, list)
        and len(shape) == 2
        and all(isinstance(v, int) and v > 0 for v in shape)
        and shape[0] == packed.shape[0]
        and -(-shape[1] // 8) == words
    )
    if not fits:
        raise FormatError(
            f"{source.info(parts['shape']).file}: tensor {parts['shape']!r}: {shape} does not "
            f"describe the packed weight {list(packed.shape)} (want [rows, cols] with "
            "rows equal to the packed rows and ⌈cols/8⌉ equal to its words)",
            "the compressed-tensors checkpoint is corrupt",
        )
    return QuantizedTensor(f"{module}.weight", CT_PACKED, (shape[0], shape[1]), parts)


def _check_pow2(source: TensorSource, scheme: QuantScheme) -> None:
    """FP8 scales stored wider than e8m0 but all powers of two (DeepSeek V3.1) stay so."""
    wide = [qt for qt in scheme.tensors.values() if qt.scheme == FP8_BLOCK and not qt.pow2]
    if not wide:  # (a plain base needs no torch to plan: lora_cli/preload.py)
        return
    from lora_cli.io.quant import is_power_of_two

    for qt in wide:
        qt.pow2 = is_power_of_two(source.read(qt.parts["scale"]))


class DequantizedSource(TensorSource):
    """``raw`` with the quantized weights named in ``expose`` replaced by their bf16 value.

    The raw parts of an exposed weight (scales, packing, shapes) disappear from the
    listing; everything else, untouched quantized weights included, is the raw tensor.
    """

    def __init__(self, raw: TensorSource, scheme: QuantScheme, expose: set[str]) -> None:
        self.raw = raw
        self.scheme = scheme
        self.exposed = {n: scheme.tensors[n] for n in expose}
        hidden = {p: qt for qt in self.exposed.values() for p in qt.parts.values()}
        infos: dict[str, TensorInfo] = {}
        for name, info in raw.infos.items():
            qt = hidden.get(name)
            if qt is None:
                infos[name] = info
            elif name == qt.primary:
                numel = 1
                for d in qt.shape:
                    numel *= d
                infos[qt.name] = TensorInfo(qt.name, "BF16", qt.shape, numel * 2, info.file)
        super().__init__(
            raw.root,
            raw.format,
            raw.files,
            infos,
            index_path=raw.index_path,
            index_map=raw.index_map,
            file_metadata=raw.file_metadata,
            skipped=raw.skipped,
        )

    def fd(self, path: Any) -> int:
        return self.raw.fd(path)

    def read(
        self,
        name: str,
        *,
        pin: bool = False,
        out: torch.Tensor | None = None,
        rows: tuple[int, int] | None = None,
        device: str | None = None,
    ) -> torch.Tensor:
        """``device``: decode an exposed weight there (its raw parts are copied over from
        pinned buffers); other tensors come back on the CPU as from any source."""
        qt = self.exposed.get(name)
        if qt is None:
            return self.raw.read(name, pin=pin, out=out, rows=rows)
        return qt.decode(self.raw, rows, device)

    def reads_rows(self, name: str) -> bool:
        qt = self.exposed.get(name)
        return qt.reads_rows if qt is not None else self.raw.reads_rows(name)

    def close(self) -> None:
        self.raw.close()
