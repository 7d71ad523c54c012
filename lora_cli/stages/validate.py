"""``lora validate``: integrity checks on a checkpoint, adapter or weights file, and a
recomputation of a merged checkpoint from its BASE and ADAPTER.

Nothing here prints. ``validate`` returns a ``ValidateReport`` whose findings are records
(file, tensor, check, message) that render as one line each; its exit code is 0 without
findings and 1 with any. What makes the check impossible (a path that does not exist,
options that do not go together, inputs that cannot be merged) is raised as a
``LoraError`` instead, which the CLI turns into exit code 2. A corrupt file *inside* what
is being validated is a finding, found per file, so one bad shard does not hide the rest.

Memory stays at about one tensor: every tensor of PATH is read once, scanned for NaN/Inf
and, in recompute mode, compared right away with the base's bytes (untouched tensors) or
with the value ``merge`` computes for it (``merge.run.compute_tensor``, the one shared
code path), in chunks.
"""

from __future__ import annotations

import ast
import hashlib
import math
import random
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_cli.adapters.peft import CONFIG_NAME, find_adapter_files, is_adapter, load_adapter
from lora_cli.errors import EXIT_FINDINGS, EXIT_OK, FormatError, LoraError, UsageError
from lora_cli.io.dtypes import FLOAT_DTYPES, SAFETENSORS_DTYPES
from lora_cli.io.layout import MANIFEST_NAME, read_json, read_manifest, sha256_file, tie_setting
from lora_cli.io.reader import INDEX_SUFFIXES, TORCH_SUFFIXES, TensorInfo, TensorSource, open_source
from lora_cli.merge.resolve import INPUT_EMBEDDING_SUFFIXES, OUTPUT_EMBEDDING

if TYPE_CHECKING:
    import torch

    from lora_cli.merge.plan import MergePlan, TensorAction

SCHEMA = "lora-validate/1"
DEFAULT_ULPS = 1
SAMPLE_BLOCKS = 2  # row blocks recomputed per big adapter-touched tensor with --sample
CHUNK = 1 << 22  # elements per comparison/scan chunk: bounded temporaries on huge tensors
CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")

# Check names, stable in the JSON document.
CHECKS = (
    "header",  # safetensors header (Rust rules) / torch zip structure; the file can be read
    "index",  # index ↔ shards: no missing or extra shard, names agree, total_size
    "duplicates",  # a tensor name in two files; aliased storage
    "shapes",  # dtypes and shapes sane (zero-size tensors)
    "finite",  # NaN / Inf values
    "config",  # config.json ↔ weights (tie_word_embeddings, dtype)
    "manifest",  # lora-checksums.sha256
    "adapter",  # adapter config and tensors (what `inspect` warns about)
    "adapter-base",  # adapter keys and shapes against --base
    "untouched",  # tensors the adapter does not touch are byte-identical to the base's
    "recompute",  # touched tensors equal BASE + ADAPTER within tolerance; coverage
)


@dataclass
class Finding:
    file: str
    tensor: str | None
    check: str
    message: str

    def line(self) -> str:
        where = f"{self.file}: {self.tensor}" if self.tensor else self.file
        return f"{where}: {self.check}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "tensor": self.tensor,
            "check": self.check,
            "message": self.message,
        }


@dataclass
class Recomputed:
    """One tensor of PATH compared with what BASE + ADAPTER give."""

    tensor: str
    kind: str  # copy | merge | replace | rows
    max_abs_error: float  # inf where NaN-ness differs
    max_ulp: int | None  # None where NaN-ness differs or the dtype is not floating point
    ok: bool
    rows: list[tuple[int, int]] | None = None  # row ranges compared; None: the whole tensor

    def to_json(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "kind": self.kind,
            "max_abs_error": self.max_abs_error if math.isfinite(self.max_abs_error) else None,
            "max_ulp": self.max_ulp,
            "ok": self.ok,
            "rows": [list(r) for r in self.rows] if self.rows else None,
        }


@dataclass
class ValidateReport:
    path: Path
    kind: str  # checkpoint | file | adapter
    base: Path | None = None
    adapter: Path | None = None
    atol: float = 0.0
    rtol: float = 0.0
    sample: int | None = None
    findings: list[Finding] = field(default_factory=list)
    recomputed: list[Recomputed] = field(default_factory=list)
    checks: dict[str, str] = field(default_factory=dict)  # check → ok | failed
    notes: list[str] = field(default_factory=list)
    tensors_checked: int = 0

    @property
    def valid(self) -> bool:
        return not self.findings

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.valid else EXIT_FINDINGS

    def ran(self, check: str) -> None:
        self.checks.setdefault(check, "ok")

    def add(self, file: str | Path, tensor: str | None, check: str, message: str) -> None:
        name = file.name if isinstance(file, Path) else file
        self.findings.append(Finding(name, tensor, check, message))
        self.checks[check] = "failed"

    def summary_line(self) -> str:
        compared = (
            f", {len(self.recomputed)} compared with BASE + ADAPTER" if self.recomputed else ""
        )
        head = f"{self.path} ({self.kind}): {self.tensors_checked} tensors read{compared}"
        if self.valid:
            return f"valid: {head}; checks passed: {', '.join(self.checks)}"
        failed = [c for c, s in self.checks.items() if s == "failed"]
        n = len(self.findings)
        return f"INVALID: {head}; {n} finding{'s' * (n != 1)} ({', '.join(failed)})"

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "path": str(self.path),
            "kind": self.kind,
            "valid": self.valid,
            "exit_code": self.exit_code,
            "base": str(self.base) if self.base else None,
            "adapter": str(self.adapter) if self.adapter else None,
            "tolerance": {"ulp": DEFAULT_ULPS, "atol": self.atol, "rtol": self.rtol},
            "sample": self.sample,
            "tensors_checked": self.tensors_checked,
            "checks": dict(self.checks),
            "findings": [f.to_json() for f in self.findings],
            "recomputed": [r.to_json() for r in self.recomputed],
            "notes": list(self.notes),
        }


# -- entry point ----------------------------------------------------------------------------
def validate(
    path: Path,
    *,
    base: Path | None = None,
    adapter: Path | None = None,
    atol: float = 0.0,
    rtol: float = 0.0,
    sample: int | None = None,
    device: str = "auto",
) -> ValidateReport:
    path = Path(path)
    for name, value in (("--atol", atol), ("--rtol", rtol)):
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"{name} {value} must be a finite number ≥ 0")
    if sample is not None and sample < 0:
        raise UsageError(f"--sample {sample} must be ≥ 0")
    if not path.exists():
        raise FormatError(f"{path}: no such file or directory")
    recompute_options = sample is not None or atol or rtol
    if is_adapter(path):
        if adapter is not None:
            raise UsageError(
                f"{path} is an adapter; --adapter is for checking a merged checkpoint",
                "to check an adapter against a base model, pass only --base BASE",
            )
        if recompute_options:
            raise UsageError("--sample, --atol and --rtol apply to --base with --adapter")
        report = ValidateReport(path, "adapter", base=Path(base) if base else None)
        _validate_adapter(report, path, Path(base) if base else None)
        return report
    if (base is None) != (adapter is None):
        raise UsageError(
            "--base and --adapter go together",
            "pass both to recompute a merged checkpoint, or neither for structural checks",
        )
    if base is None and recompute_options:
        raise UsageError("--sample, --atol and --rtol apply to --base with --adapter")
    report = ValidateReport(
        path,
        "file" if path.is_file() and not path.name.endswith(INDEX_SUFFIXES) else "checkpoint",
        base=Path(base) if base else None,
        adapter=Path(adapter) if adapter else None,
        atol=atol,
        rtol=rtol,
        sample=sample,
    )
    _WeightsCheck(report, path, device).run()
    return report


# -- helpers --------------------------------------------------------------------------------
_TENSOR_PREFIX = re.compile(r"^tensor ('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"): ")


def _split_error(exc: LoraError, file: Path) -> tuple[str | None, str]:
    """(tensor, message) from a reader error, without the file prefix it already carries."""
    message = exc.message
    for prefix in (f"{file}: ", f"{file.name}: "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
            break
    m = _TENSOR_PREFIX.match(message)
    if m:
        try:
            return str(ast.literal_eval(m.group(1))), message[m.end() :]
        except (ValueError, SyntaxError):
            pass
    return None, message


def _ensure_readable(path: Path) -> None:
    """A file we may not open makes validation impossible (exit 2), not a finding."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror})") from None


def _config_dtype(value: Any) -> str | None:
    """``"bfloat16"`` / ``"torch.bfloat16"`` → ``BF16``; None when unknown."""
    if not isinstance(value, str):
        return None
    attr = value.removeprefix("torch.")
    for name, (_, a) in SAFETENSORS_DTYPES.items():
        if a == attr:
            return name
    return None


def count_nonfinite(t: torch.Tensor) -> tuple[int, int]:
    """(NaN count, ±Inf count) of a floating point tensor, in bounded chunks."""
    import torch

    flat = t.reshape(-1)
    nan = inf = 0
    for i in range(0, flat.numel(), CHUNK):
        c = flat[i : i + CHUNK]
        if c.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            c = c.float()
        nan += int(torch.isnan(c).sum())
        inf += int(torch.isinf(c).sum())
    return nan, inf


_INT_VIEW = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units of last place between two float tensors of one dtype,
    as float64 (exact below 2**53). +0 and -0 are 0 apart; NaN positions are meaningless
    (callers mask them)."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        raise ValueError(f"ulp_distance needs one dtype and shape ({a.dtype} {b.dtype})")
    int_type = getattr(torch, _INT_VIEW[a.element_size()])
    bits = a.element_size() * 8
    mask = (1 << (bits - 1)) - 1
    ai = a.contiguous().view(int_type).to(torch.int64)
    bi = b.contiguous().view(int_type).to(torch.int64)
    # sign-magnitude → a monotonic integer line
    am = torch.where(ai < 0, -(ai & mask), ai)
    bm = torch.where(bi < 0, -(bi & mask), bi)
    same_sign = (am >= 0) == (bm >= 0)
    # with equal signs the int64 difference cannot overflow; across zero add magnitudes
    return torch.where(
        same_sign, (am - bm).abs().to(torch.float64), am.abs().double() + bm.abs().double()
    )


def max_ulp(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest ulp distance between two float tensors of one dtype (NaN pairs ignored)."""
    import torch

    fa, fb = a.reshape(-1), b.reshape(-1)
    worst = 0
    for i in range(0, fa.numel(), CHUNK):
        ca, cb = fa[i : i + CHUNK], fb[i : i + CHUNK]
        d = ulp_distance(ca, cb)
        d = torch.where(torch.isnan(ca.double()) | torch.isnan(cb.double()), 0.0, d)
        if d.numel():
            worst = max(worst, int(d.max()))
    return worst


@dataclass
class Diff:
    identical: bool  # bit for bit
    max_abs: float
    max_ulp: int | None
    bad: int  # elements outside the tolerance

    @staticmethod
    def combine(diffs: Iterable[Diff]) -> Diff:
        out = Diff(True, 0.0, 0, 0)
        for d in diffs:
            out.identical &= d.identical
            out.max_abs = max(out.max_abs, d.max_abs)
            if out.max_ulp is not None:
                out.max_ulp = None if d.max_ulp is None else max(out.max_ulp, d.max_ulp)
            out.bad += d.bad
        return out


def compare(got: torch.Tensor, exp: torch.Tensor, dtype: str, atol: float, rtol: float) -> Diff:
    """Compare two tensors of one dtype and shape, chunk by chunk.

    Floating point: an element is within tolerance when it is at most ``DEFAULT_ULPS``
    ulp away or ``|got - exp| <= atol + rtol * |exp|``; NaN must meet NaN. Other dtypes
    must be bit-identical.
    """
    import torch

    g, e = got.reshape(-1), exp.reshape(-1)
    if g.dtype != e.dtype or g.numel() != e.numel():
        raise ValueError("compare needs one dtype and size")
    floating = dtype in FLOAT_DTYPES
    integer = dtype[0] in "IU"
    identical = True
    max_abs = 0.0
    worst_ulp: int | None = 0 if floating else None
    bad = 0
    for i in range(0, g.numel(), CHUNK):
        cg, ce = g[i : i + CHUNK], e[i : i + CHUNK]
        iv = getattr(torch, _INT_VIEW[g.element_size()])
        same = cg.view(iv) == ce.view(iv)
        if bool(same.all()):
            continue
        identical = False
        if not floating:
            bad += int((~same).sum())
            if integer:
                diff = (cg.to(torch.float64) - ce.to(torch.float64)).abs()
                max_abs = max(max_abs, float(diff.max()))
            else:
                max_abs = math.inf
            continue
        g64, e64 = cg.to(torch.float64), ce.to(torch.float64)
        nan_g, nan_e = torch.isnan(g64), torch.isnan(e64)
        nan_mismatch = nan_g != nan_e
        diff = torch.where(same | (nan_g & nan_e), 0.0, (g64 - e64).abs())
        diff = torch.where(nan_mismatch | torch.isnan(diff), math.inf, diff)
        ulp = torch.where(nan_g | nan_e, 0.0, ulp_distance(cg, ce))
        within = (ulp <= DEFAULT_ULPS) | (diff <= atol + rtol * e64.abs())
        within &= ~nan_mismatch
        bad += int((~within).sum())
        max_abs = max(max_abs, float(diff.max()))
        if worst_ulp is not None:
            worst_ulp = None if bool(nan_mismatch.any()) else max(worst_ulp, int(ulp.max()))
    return Diff(identical, max_abs, worst_ulp, bad)


def _close_all(sources: dict[Path, TensorSource]) -> None:
    for src in sources.values():
        src.close()


def _check_manifest(report: ValidateReport, root: Path, only: str | None = None) -> None:
    """Verify ``lora-checksums.sha256`` when there is one; ``only``: one file's line."""
    try:
        entries = read_manifest(root)
    except (LoraError, OSError, UnicodeDecodeError) as exc:
        report.add(MANIFEST_NAME, None, "manifest", getattr(exc, "message", str(exc)))
        return
    if entries is None:
        if only is None:
            report.notes.append(f"no checksum manifest ({MANIFEST_NAME}) to verify")
        return
    report.ran("manifest")
    for name, digest in entries.items():
        if only is not None and name != only:
            continue
        p = root / name
        if "/" in name or name in (".", "..") or not p.is_file():
            report.add(name, None, "manifest", "listed in the checksum manifest but missing")
            continue
        _ensure_readable(p)
        actual = sha256_file(p)
        if actual != digest.lower():
            report.add(
                name,
                None,
                "manifest",
                f"sha256 {actual[:12]}… differs from the manifest's {digest[:12]}…: the file "
                "changed after it was written",
            )
    if only is not None:
        if only not in entries:
            report.notes.append(f"{only} is not listed in {MANIFEST_NAME}")
        return
    extra = sorted(
        p.name
        for p in root.iterdir()
        if p.is_file() and p.name != MANIFEST_NAME and p.name not in entries
        and not p.name.startswith(".")
    )  # fmt: skip
    if extra:
        report.notes.append(f"files not covered by {MANIFEST_NAME}: {', '.join(extra)}")


# -- checkpoints and weights files ---------------------------------------------------------
class _WeightsCheck:
    def __init__(self, report: ValidateReport, path: Path, device: str) -> None:
        self.r = report
        self.path = path
        self.root = path if path.is_dir() else path.parent
        self.device = device
        self.sources: dict[Path, TensorSource] = {}
        self.broken: set[Path] = set()  # files that could not be read
        self.incomplete = False  # some weights are unreadable or missing
        self.index: Path | None = None
        self.single: Path | None = None
        self.files: list[Path] = []
        # recompute mode
        self.plan: MergePlan | None = None
        self.actions: dict[str, TensorAction] = {}
        self.selected: set[str] = set()
        self.seen: set[str] = set()
        self.dev = "cpu"
        self.row_sampled = 0
        self.sample_note = ""
        self.base_src: TensorSource | None = None
        self.adapter_obj: Any = None

    # layout ---------------------------------------------------------------------------
    def _discover(self) -> None:
        p = self.path
        if p.is_file():
            if p.name.endswith(INDEX_SUFFIXES):
                self.index = p
                root = p.parent
                safe = p.name.endswith(".safetensors.index.json")
                suffixes = (".safetensors",) if safe else TORCH_SUFFIXES
                self.root = root
                self.files = sorted(
                    f
                    for f in root.iterdir()
                    if f.is_file()
                    and f.suffix in suffixes
                    and (safe or f.name.startswith(("pytorch_model", "model")))
                )
                return
            self.root = p.parent
            self.single = p
            self.files = [p]
            return
        self.root = p
        entries = sorted(p.iterdir())
        st_indexes = [f for f in entries if f.name.endswith(".safetensors.index.json")]
        st_files = [f for f in entries if f.suffix == ".safetensors" and f.is_file()]
        pickles = [
            f
            for f in entries
            if f.suffix in TORCH_SUFFIXES
            and f.is_file()
            and f.name.startswith(("pytorch_model", "model", "adapter_model"))
        ]
        bin_indexes = [f for f in entries if f.name.endswith((".bin.index.json", ".pt.index.json"))]
        if st_indexes or st_files:
            self.files = st_files
            if len(st_indexes) > 1:
                preferred = [f for f in st_indexes if f.name == "model.safetensors.index.json"]
                self.index = (preferred or st_indexes)[0]
                self.r.add(
                    self.index,
                    None,
                    "index",
                    f"{len(st_indexes)} safetensors indexes in one folder "
                    f"({', '.join(f.name for f in st_indexes)}); loaders pick one",
                )
            elif st_indexes:
                self.index = st_indexes[0]
            if pickles:
                self.r.notes.append(
                    f"also holds {', '.join(f.name for f in pickles)}; loaders prefer the "
                    "safetensors files, which were checked"
                )
        elif pickles or bin_indexes:
            self.files = pickles
            self.index = bin_indexes[0] if bin_indexes else None
        else:
            raise FormatError(
                f"{p}: no weights found (no *.safetensors, index, or pytorch_model*.bin)",
                "point at a checkpoint folder, an adapter folder or a weights file",
            )

    def _open_files(self) -> None:
        self.r.ran("header")
        for f in self.files:
            _ensure_readable(f)
            try:
                self.sources[f] = open_source(f)
            except LoraError as exc:
                tensor, message = _split_error(exc, f)
                self.r.add(f, tensor, "header", message)
                self.broken.add(f)
                self.incomplete = True

    def _check_names(self) -> None:
        self.r.ran("duplicates")
        owner: dict[str, Path] = {}
        for f, src in self.sources.items():
            for name in src.names():
                if name in owner:
                    self.r.add(
                        f,
                        name,
                        "duplicates",
                        f"also stored in {owner[name].name}; loaders keep one of the two",
                    )
                else:
                    owner[name] = f
            shared: dict[str, list[str]] = {}
            for info in src.infos.values():
                if info.storage and info.nbytes:
                    shared.setdefault(info.storage, []).append(info.name)
            groups = [sorted(g) for g in shared.values() if len(g) > 1]
            if groups:
                self.r.notes.append(
                    f"{f.name}: {len(groups)} groups of tensors share storage (e.g. "
                    f"{', '.join(groups[0])}); safetensors stores each once (`lora convert`)"
                )

    def _check_index(self) -> None:
        index = self.index
        if index is None:
            return
        self.r.ran("index")
        try:
            doc = read_json(index, "index")
        except LoraError as exc:
            self.r.add(index, None, "index", _split_error(exc, index)[1])
            return
        weight_map = doc.get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            self.r.add(index, None, "index", "no 'weight_map' of tensor name → shard file")
            return
        counts = Counter(weight_map.values())
        for shard in sorted(counts):
            p = self.root / shard
            if "/" in shard or shard.startswith(".") or not p.is_file():
                self.r.add(
                    index,
                    None,
                    "index",
                    f"names shard {shard!r} ({counts[shard]} tensors), which is missing",
                )
                self.incomplete = True
        for f in self.files:
            if f.name not in counts:
                self.r.add(f, None, "index", f"shard is not named by {index.name} (extra file)")
        for name, shard in weight_map.items():
            src = self.sources.get(self.root / shard)
            if src is not None and name not in src:
                self.r.add(
                    index, name, "index", f"listed in {shard} but that shard does not hold it"
                )
        for f, src in self.sources.items():
            if f.name not in counts:
                continue
            for name in src.names():
                listed = weight_map.get(name)
                if listed is None:
                    self.r.add(f, name, "index", f"stored in the shard but not in {index.name}")
                elif listed != f.name and (self.root / listed) != f:
                    # the duplicate shows up under `duplicates` when the other shard holds it
                    self.r.add(f, name, "index", f"stored here but {index.name} says {listed}")
        meta = doc.get("metadata")
        total = meta.get("total_size") if isinstance(meta, dict) else None
        if total is None:
            self.r.notes.append(f"{index.name} has no metadata.total_size")
            return
        if isinstance(total, bool) or not isinstance(total, int):
            self.r.add(index, None, "index", f"metadata.total_size {total!r} is not an integer")
            return
        named = [self.root / s for s in counts]
        if any(p in self.broken or p not in self.sources for p in named):
            self.r.notes.append("total_size not checked: some shards could not be read")
            return
        actual = sum(self.sources[p].total_bytes for p in named)
        if total != actual:
            self.r.add(
                index,
                None,
                "index",
                f"metadata.total_size is {total} but the shards hold {actual} tensor bytes "
                f"(off by {total - actual:+d})",
            )

    def _infos(self) -> dict[str, TensorInfo]:
        out: dict[str, TensorInfo] = {}
        for src in self.sources.values():
            for name, info in src.infos.items():
                out.setdefault(name, info)
        return out

    def _check_config(self) -> None:
        config_path = self.root / "config.json"
        infos = self._infos()
        if not config_path.is_file():
            from lora_cli.stages.inspect import _looks_like_peft_state_dict

            if any(_looks_like_peft_state_dict(s) for s in self.sources.values()):
                self.r.ran("adapter")
                self.r.add(
                    self.files[0] if self.files else self.root,
                    None,
                    "adapter",
                    f"holds LoRA tensors (lora_A/lora_B) but no {CONFIG_NAME} beside them: r "
                    "and lora_alpha cannot be recovered",
                )
            else:
                self.r.notes.append("no config.json: config checks skipped")
            return
        self.r.ran("config")
        try:
            config = read_json(config_path, "model config")
        except LoraError as exc:
            self.r.add(config_path, None, "config", _split_error(exc, config_path)[1])
            return
        if self.incomplete:
            self.r.notes.append("config.json compared with the readable shards only")
        tie = tie_setting(config)
        archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
        heads = [n for n in infos if n == OUTPUT_EMBEDDING or n.endswith("." + OUTPUT_EMBEDDING)]
        embeds = [n for n in infos if n.endswith(INPUT_EMBEDDING_SUFFIXES)]
        if (
            tie is False
            and not heads
            and embeds
            and any(a.endswith(CAUSAL_HEADS) for a in archs)
            and not self.incomplete
        ):
            self.r.add(
                config_path,
                OUTPUT_EMBEDDING,
                "config",
                "tie_word_embeddings is false but lm_head.weight is not stored: transformers "
                "would initialise the output layer at random",
            )
        if tie and OUTPUT_EMBEDDING in infos and len(embeds) == 1:
            self._check_tied_head(config_path, infos[OUTPUT_EMBEDDING], infos[embeds[0]])
        for key in ("dtype", "torch_dtype"):
            value = config.get(key)
            if value is None or value == "auto":
                continue
            want = _config_dtype(value)
            floats = Counter(i.dtype for i in infos.values() if i.dtype in FLOAT_DTYPES)
            if want is None:
                self.r.add(config_path, None, "config", f"{key} {value!r} is not a known dtype")
            elif floats and want not in floats:
                main = ", ".join(f"{d}×{n}" for d, n in floats.most_common())
                self.r.add(
                    config_path,
                    None,
                    "config",
                    f"{key} is {value!r} but no floating point tensor is {want} ({main}); "
                    "loaders would cast every weight",
                )

    def _check_tied_head(self, config_path: Path, head: TensorInfo, embed: TensorInfo) -> None:
        if head.shape != embed.shape or head.dtype != embed.dtype:
            self.r.add(
                config_path,
                OUTPUT_EMBEDDING,
                "config",
                f"tie_word_embeddings is true but lm_head.weight is {head.dtype} "
                f"{list(head.shape)} and {embed.name} is {embed.dtype} {list(embed.shape)}",
            )
            return
        a = self._source_of(head).read(head.name)
        b = self._source_of(embed).read(embed.name)
        if not compare(a, b, head.dtype, 0.0, 0.0).identical:
            self.r.add(
                config_path,
                OUTPUT_EMBEDDING,
                "config",
                f"tie_word_embeddings is true but lm_head.weight differs from {embed.name}: "
                "transformers would discard it and reuse the embedding",
            )

    def _source_of(self, info: TensorInfo) -> TensorSource:
        return next(s for s in self.sources.values() if s.infos.get(info.name) is info)

    # recompute ------------------------------------------------------------------------
    def _prepare_recompute(self) -> None:
        from lora_cli.merge.plan import build_plan
        from lora_cli.merge.run import resolve_device

        r = self.r
        assert r.base is not None and r.adapter is not None
        self.dev = resolve_device(self.device)
        self.base_src = open_source(r.base)
        self.adapter_obj = load_adapter(r.adapter)
        infos = self._infos()
        path_floats = {i.dtype for i in infos.values() if i.dtype in FLOAT_DTYPES}
        base_floats = {i.dtype for i in self.base_src.infos.values() if i.dtype in FLOAT_DTYPES}
        out_dtype = None
        if len(path_floats) == 1 and path_floats != base_floats:
            out_dtype = next(iter(path_floats))
            r.notes.append(
                f"every floating point tensor of PATH is {out_dtype} (BASE: "
                f"{', '.join(sorted(base_floats))}): recomputed as `merge --dtype` {out_dtype}"
            )
        self.plan = build_plan(self.base_src, self.adapter_obj, out_dtype=out_dtype)
        self.actions = {a.name: a for a in self.plan.actions()}
        touched = [n for n, a in self.actions.items() if a.kind != "copy"]
        untouched = [n for n, a in self.actions.items() if a.kind == "copy"]
        if r.sample is None:
            chosen = untouched
        else:
            chosen = sorted(untouched, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
            chosen = chosen[: r.sample]
            self.sample_note = (
                f"--sample {r.sample}: {len(chosen)} of {len(untouched)} untouched tensors "
                f"compared with the base (chosen by sha256 of the name); all {len(touched)} "
                "adapter-touched tensors recomputed"
            )
        self.selected = set(touched) | set(chosen)
        r.ran("untouched")
        r.ran("recompute")

    def _compare(self, file: Path, name: str, got: torch.Tensor, dtype: str) -> None:
        from lora_cli.io.dtypes import from_torch
        from lora_cli.merge.run import compute_tensor

        r = self.r
        act = self.actions.get(name)
        if act is None:
            r.add(file, name, "recompute", "not produced by merging BASE with ADAPTER (extra)")
            return
        self.seen.add(name)
        if name not in self.selected:
            return
        if dtype != act.dtype or tuple(got.shape) != tuple(act.shape):
            r.add(
                file,
                name,
                "recompute",
                f"is {dtype} {list(got.shape)} but the merge gives {act.dtype} {list(act.shape)}",
            )
            return
        assert self.plan is not None and self.base_src is not None
        base_info = self.base_src.info(act.base) if act.base else None
        if act.kind == "copy" and base_info is not None and base_info.dtype == act.dtype:
            expected = self.base_src.read(act.base)
            check = "untouched"
        else:
            check = "untouched" if act.kind == "copy" else "recompute"
            blocks = self._sampled_rows(act) if check == "recompute" else None
            if blocks is not None:
                d = Diff.combine(
                    compare(got[a:b], compute_tensor(self.plan, act, self.dev, None, (a, b)),
                            dtype, r.atol, r.rtol)
                    for a, b in blocks
                )  # fmt: skip
                ok = d.bad == 0
                r.recomputed.append(Recomputed(name, act.kind, d.max_abs, d.max_ulp, ok, blocks))
                self._report(file, name, check, d, got, ok, blocks)
                return
            expected = compute_tensor(self.plan, act, self.dev)
        if from_torch(expected.dtype) != dtype:  # defensive: the planned dtype is dtype
            expected = expected.to(got.dtype)
        d = compare(got, expected.reshape(got.shape), dtype, r.atol, r.rtol)
        del expected
        ok = d.identical if check == "untouched" else d.bad == 0
        r.recomputed.append(Recomputed(name, act.kind, d.max_abs, d.max_ulp, ok))
        self._report(file, name, check, d, got, ok, None)

    def _sampled_rows(self, act: TensorAction) -> list[tuple[int, int]] | None:
        """With --sample, a seeded random choice of the row blocks ``merge`` streams a big
        tensor in (same math, fewer rows); None to recompute the whole tensor."""
        from lora_cli.merge.run import row_blocks

        if self.r.sample is None or self.plan is None:
            return None
        blocks = row_blocks(self.plan, act)
        if not blocks or len(blocks) <= SAMPLE_BLOCKS:
            return None
        rng = random.Random(hashlib.sha256(act.name.encode()).digest())
        self.row_sampled += 1
        return sorted(rng.sample(blocks, SAMPLE_BLOCKS))

    def _report(
        self,
        file: Path,
        name: str,
        check: str,
        d: Diff,
        got: torch.Tensor,
        ok: bool,
        blocks: list[tuple[int, int]] | None,
    ) -> None:
        r = self.r
        if ok:
            return
        ulp = f"{d.max_ulp} ulp" if d.max_ulp is not None else "NaN where the other has none"
        if check == "untouched":
            r.add(
                file,
                name,
                check,
                f"differs from the base's bytes (max abs error {d.max_abs:.3g}, {ulp}); "
                "tensors the adapter does not touch must be byte-identical",
            )
        else:
            tol = f"{DEFAULT_ULPS} ulp"
            if r.atol or r.rtol:
                tol += f" or atol {r.atol:g} + rtol {r.rtol:g}"
            where = f" in sampled rows {blocks}" if blocks else ""
            r.add(
                file,
                name,
                check,
                f"{d.bad} of {got.numel()} values{where} differ from BASE + ADAPTER by more "
                f"than {tol} (max abs error {d.max_abs:.3g}, {ulp})",
            )

    def _finish_recompute(self) -> None:
        r = self.r
        if r.sample is not None:
            how = (
                f", {self.row_sampled} of them (those merge streams in row blocks) on "
                f"{SAMPLE_BLOCKS} row blocks chosen at random, seeded by the name, the rest "
                "in full"
                if self.row_sampled
                else " in full"
            )
            r.notes.append(self.sample_note + how)
        missing = [n for n in self.actions if n not in self.seen]
        if missing and self.incomplete:
            r.notes.append(
                f"{len(missing)} tensors of the merge were not compared: their shards could "
                "not be read"
            )
        elif missing:
            for name in missing:
                r.add(
                    self.index or self.path,
                    name,
                    "recompute",
                    "missing: merging BASE with ADAPTER produces it",
                )
        assert self.plan is not None
        if self.plan.config_updates:
            config_path = self.root / "config.json"
            try:
                config = read_json(config_path, "model config")
            except LoraError:
                config = None
            for key, value in self.plan.config_updates.items():
                got = (config or {}).get(key, "<absent>")
                if got != value:
                    r.add(
                        config_path,
                        None,
                        "recompute",
                        f"{key} is {got!r} but merging BASE with ADAPTER sets {value!r}",
                    )

    # scan -----------------------------------------------------------------------------
    def _scan(self) -> None:
        r = self.r
        r.ran("shapes")
        r.ran("finite")
        for f in self.files:
            src = self.sources.get(f)
            if src is None:
                continue
            for info in src.infos.values():
                r.tensors_checked += 1
                if info.numel == 0:
                    r.add(
                        f,
                        info.name,
                        "shapes",
                        f"zero-size tensor {list(info.shape)} (a DeepSpeed ZeRO-3 placeholder?)",
                    )
                try:
                    t = src.read(info.name)
                except LoraError as exc:
                    tensor, message = _split_error(exc, f)
                    r.add(f, tensor or info.name, "header", message)
                    continue
                if info.dtype in FLOAT_DTYPES:
                    nan, inf = count_nonfinite(t)
                    if nan or inf:
                        r.add(
                            f,
                            info.name,
                            "finite",
                            f"{nan + inf} of {info.numel} values are not finite "
                            f"({nan} NaN, {inf} Inf)",
                        )
                if self.plan is not None:
                    self._compare(f, info.name, t, info.dtype)
                del t

    def run(self) -> None:
        r = self.r
        self._discover()
        try:
            self._open_files()
            self._check_names()
            self._check_index()
            if self.single is None:
                self._check_config()
            _check_manifest(r, self.root, self.single.name if self.single else None)
            if r.base is not None:
                self._prepare_recompute()
            self._scan()
            if self.plan is not None:
                self._finish_recompute()
        finally:
            _close_all(self.sources)
            if self.base_src is not None:
                self.base_src.close()
            if self.adapter_obj is not None:
                self.adapter_obj.close()


# -- adapters -------------------------------------------------------------------------------
def _validate_adapter(report: ValidateReport, path: Path, base: Path | None) -> None:
    from lora_cli.stages.inspect import _all_zero_b, regex_matches

    r = report
    r.ran("adapter")
    try:
        config_path, weights = find_adapter_files(path)
    except LoraError as exc:
        r.add(CONFIG_NAME, None, "adapter", exc.message)
        return
    root = config_path.parent
    _ensure_readable(config_path)
    _ensure_readable(weights)
    config: dict[str, Any] | None = None
    try:
        config = read_json(config_path, "adapter config")
        if "peft_type" not in config:
            r.add(config_path, None, "adapter", "no 'peft_type': not a PEFT adapter config")
            config = None
    except LoraError as exc:
        r.add(config_path, None, "adapter", _split_error(exc, config_path)[1])

    r.ran("header")
    r.ran("finite")
    tensors_ok = True
    try:
        src = open_source(weights)
    except LoraError as exc:
        tensor, message = _split_error(exc, weights)
        r.add(weights, tensor, "header", message)
        src = None
        tensors_ok = False
    if src is not None:
        with src:
            for info in src.infos.values():
                r.tensors_checked += 1
                try:
                    t = src.read(info.name)
                except LoraError as exc:
                    tensor, message = _split_error(exc, weights)
                    r.add(weights, tensor or info.name, "header", message)
                    tensors_ok = False
                    continue
                if info.dtype in FLOAT_DTYPES and info.numel:
                    nan, inf = count_nonfinite(t)
                    if nan or inf:
                        tensors_ok = False
                        r.add(
                            weights,
                            info.name,
                            "finite",
                            f"{nan + inf} of {info.numel} values are not finite "
                            f"({nan} NaN, {inf} Inf)",
                        )
    if path.is_dir():
        _check_manifest(r, root)
    else:
        _check_manifest(r, root, weights.name)
    if config is None or src is None:
        return
    try:
        adapter = load_adapter(path)
    except LoraError as exc:
        r.add(weights, None, "adapter", _split_error(exc, weights)[1])
        return
    try:
        for w in adapter.warnings:
            r.add(weights, None, "adapter", w)
            tensors_ok = tensors_ok and "zero-size" not in w and "no LoRA tensors" not in w
        for w in _all_zero_b(adapter):
            r.add(weights, None, "adapter", w)
        targets = config.get("target_modules")
        if isinstance(targets, str) and targets.lower() != "all-linear" and adapter.modules:
            matched, unmatched = regex_matches(targets, list(adapter.modules))
            n = len(adapter.modules)
            if not matched:
                r.add(
                    config_path,
                    None,
                    "adapter",
                    f"regex target_modules {targets!r} matches none of the {n} adapter modules"
                    " (or is not a valid regex): PEFT would load no LoRA weights",
                )
            elif unmatched:
                r.add(
                    config_path,
                    None,
                    "adapter",
                    f"regex target_modules {targets!r} does not match {len(unmatched)} of the "
                    f"{n} adapter modules (e.g. {unmatched[0]}): PEFT would ignore their weights",
                )
        if base is not None:
            _adapter_against_base(r, adapter, base, tensors_ok)
    finally:
        adapter.close()


def _adapter_against_base(r: ValidateReport, adapter: Any, base: Path, tensors_ok: bool) -> None:
    from lora_cli.errors import MergeError
    from lora_cli.merge.plan import build_plan

    if not tensors_ok:
        r.notes.append("adapter not checked against --base: fix the tensor findings first")
        return
    r.ran("adapter-base")
    with open_source(base) as base_src:
        try:
            build_plan(base_src, adapter)
        except MergeError as exc:
            r.add(adapter.config_path, None, "adapter-base", exc.message)
