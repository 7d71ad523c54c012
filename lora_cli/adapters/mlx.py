"""mlx-lm adapters (``adapters.safetensors`` + ``adapter_config.json``) → the canonical Adapter.

mlx-lm saves the trainable leaves of its LoRA layers under the MLX module paths of the
model (post-``sanitize`` HF names): ``<module>.lora_a`` / ``.lora_b`` (and DoRA ``.m``).
Linear factors are the transposes of PEFT's (``lora_a (in, r)``, ``lora_b (r, out)``),
MoE ``SwitchLinear`` factors are stacked per expert in PEFT orientation
(``(E, r, in)``, ``(E, out, r)``) against the stacked ``switch_mlp`` weights that HF
checkpoints store per expert, and ``scale`` is the final multiplier (PEFT's
``lora_alpha / r``). The orientation comes from the format, never from shapes: square
projections would otherwise transpose silently. ``fine_tune_type: full`` files hold
full weights, which become replacements. See docs/lora-formats.md §2.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lora_cli.adapters.config_checks import check_mlx_config
from lora_cli.adapters.mlx_moe import (
    add_target_parameters,
    expert_paths,
    fused_modules,
    fused_switches,
)
from lora_cli.adapters.peft import PREFIX, Adapter, LoraModule, adapter_warnings
from lora_cli.errors import FormatError
from lora_cli.io.layout import MAX_ADAPTER_CONFIG_BYTES, read_json
from lora_cli.io.reader import open_source
from lora_cli.sources.view import Derived, ViewSource, plain, transposed

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapters.safetensors"
PERIODIC_RE = re.compile(r"^\d+_adapters\.safetensors$")
LEAVES = ("lora_a", "lora_b", "m")
# Module names mlx wraps with LoRAEmbedding (the MLX module type; shapes cannot tell).
EMBEDDING_LEAVES = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embeddings")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def is_mlx_config(config: dict[str, Any]) -> bool:
    return "peft_type" not in config and any(
        k in config for k in ("lora_parameters", "fine_tune_type", "num_layers")
    )


def find_mlx_files(path: Path) -> tuple[Path, Path] | None:
    """(config, weights) when ``path`` is an mlx-lm adapter folder or weights file."""
    path = Path(path)
    if path.is_file():
        if path.name != WEIGHTS_NAME and not PERIODIC_RE.match(path.name):
            return None
        config, weights = path.parent / CONFIG_NAME, path
    elif path.is_dir():
        config, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
        if config.is_file() and not weights.is_file():
            periodic = sorted(p for p in path.iterdir() if PERIODIC_RE.match(p.name))
            if periodic and _mlx_config(config):
                raise FormatError(
                    f"{path}: mlx-lm adapter folder without {WEIGHTS_NAME} (training did not "
                    "finish)",
                    f"pass a periodic save as a file, e.g. {periodic[-1]}",
                )
    else:
        return None
    if not config.is_file() or not weights.is_file() or not _mlx_config(config):
        return None
    return config, weights


def _mlx_config(path: Path) -> bool:
    try:
        return is_mlx_config(read_json(path, "adapter config", max_bytes=MAX_ADAPTER_CONFIG_BYTES))
    except FormatError:
        return False


def load_mlx_adapter(path: Path, base_names: Iterable[str] | None = None) -> Adapter:
    """Read an mlx-lm adapter (config + tensor listing, no data) as a canonical Adapter.

    ``base_names`` (the base checkpoint's tensor names) chooses the per-expert spelling
    of MoE experts (Mixtral ``w1`` vs ``gate_proj``); without it the model family decides.
    """
    found = find_mlx_files(Path(path))
    if found is None:
        raise FormatError(f"{path}: not an mlx-lm adapter")
    config_path, weights = found
    config = read_json(config_path, "adapter config", max_bytes=MAX_ADAPTER_CONFIG_BYTES)
    native = _native(config, config_path)
    source = open_source(weights)
    try:
        names = list(base_names) if base_names is not None else None
        return _build(config_path, weights, config, native, source, names)
    except BaseException:
        source.close()
        raise


def _native(config: dict[str, Any], config_path: Path) -> dict[str, Any]:
    params = check_mlx_config(config, config_path)
    ftype = config.get("fine_tune_type") or ("dora" if config.get("use_dora") else "lora")
    if ftype not in ("lora", "dora", "full"):
        raise FormatError(f"{config_path}: unknown fine_tune_type {ftype!r}")
    scale = params.get("scale")
    if ftype != "full" and scale is None:
        hint = "mlx-lm uses 'scale' (PEFT's lora_alpha / r); 'alpha' is ignored by mlx-lm"
        raise FormatError(f"{config_path}: lora_parameters has no 'scale'", hint)
    return {
        "fine_tune_type": ftype,
        "num_layers": config.get("num_layers"),
        "rank": params.get("rank"),
        "scale": float(scale) if scale is not None else None,
        "alpha_ignored": params.get("alpha"),
        "keys": params.get("keys"),
        "model": config.get("model"),
    }


def _build(
    config_path: Path,
    weights: Path,
    config: dict[str, Any],
    native: dict[str, Any],
    source: Any,
    base_names: list[str] | None,
) -> Adapter:
    recipes: list[Derived] = []
    modules: dict[str, LoraModule] = {}
    replacements: dict[str, str] = {}
    non_adapter: list[str] = []
    fused_params: list[tuple[str, int]] = []  # (fused parameter path, rank) for PEFT's config
    infos = source.infos

    def add(name: str, dtype: str, shape: tuple[int, ...], compute: Any) -> str:
        recipes.append(Derived(name, dtype, tuple(shape), compute))
        return name

    if native["fine_tune_type"] == "full":
        for key, info in infos.items():
            if ".switch_mlp." in key and len(info.shape) >= 2:
                module, param = key.rsplit(".", 1)
                for e, p in enumerate(expert_paths(module, info.shape[0], base_names)):
                    name = f"{PREFIX}{p}.{param}"
                    replacements[f"{p}.{param}"] = add(
                        name, info.dtype, info.shape[1:], _rows(key, e)
                    )
            else:
                replacements[key] = add(PREFIX + key, info.dtype, info.shape, plain(key))
    else:
        grouped: dict[str, dict[str, str]] = {}
        for key in infos:
            module, _, leaf = key.rpartition(".")
            if leaf in LEAVES and module:
                grouped.setdefault(module, {})[leaf] = key
            else:
                non_adapter.append(key)
        scale = native["scale"]
        fused = fused_switches(grouped, source, base_names)
        for prefix, leaves in fused.items():
            fused_params += fused_modules(prefix, leaves, source, scale, add, modules)
        for path, parts in grouped.items():
            if not any(path in leaves.values() for leaves in fused.values()):
                _module(path, parts, source, scale, add, modules, base_names, config_path)

    fused_paths = {p for p in modules if p.endswith(".experts") or ".experts.base_layer" in p}
    plain_modules = {p: m for p, m in modules.items() if p not in fused_paths}
    rank = max((m.r for m in plain_modules.values()), default=native["rank"] or 0)
    peft_config = _peft_config(native, plain_modules, rank)
    if fused_params:
        add_target_parameters(peft_config, fused_params, native["scale"], rank)
    root = weights.parent
    derived = ViewSource.derived(source, recipes, root=root, file=weights, fmt=source.format)
    adapter = Adapter(
        root=root,
        weights_file=weights,
        config_path=config_path,
        config=peft_config,
        source=derived,
        modules=modules,
        replacements=replacements,
        token_rows={},
        non_adapter=non_adapter,
        key_renames={},
        producer="mlx-lm",
        format="mlx-lm",
        native=native,
    )
    adapter.warnings = adapter_warnings(adapter)
    if non_adapter:
        adapter.warnings.append(
            f"{non_adapter[0]}: not an mlx-lm adapter leaf (lora_a, lora_b, m); mlx-lm "
            "refuses to load this file"
        )
    cfg_rank = native["rank"]
    if cfg_rank is not None and modules and any(m.r != cfg_rank for m in modules.values()):
        adapter.warnings.append(
            f"lora_parameters.rank is {cfg_rank} but the factors have rank "
            f"{sorted({m.r for m in modules.values()})}"
        )
    return adapter


def _rows(key: str, expert: int) -> Any:
    return lambda read: read(key, rows=(expert, expert + 1))[0]


def _module(
    path: str,
    parts: dict[str, str],
    source: Any,
    scale: float,
    add: Any,
    modules: dict[str, LoraModule],
    base_names: list[str] | None,
    config_path: Path,
) -> None:
    if "lora_a" not in parts or "lora_b" not in parts:
        missing = "lora_b" if "lora_a" in parts else "lora_a"
        raise FormatError(f"{config_path.parent}: module {path!r} has no {missing}")
    a, b = source.info(parts["lora_a"]), source.info(parts["lora_b"])
    if len(a.shape) == 3:  # LoRASwitchLinear: (E, r, in), (E, out, r)
        if len(b.shape) != 3 or a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
            raise FormatError(
                f"{parts['lora_a']}: SwitchLinear factors {list(a.shape)} / {list(b.shape)} "
                "do not pair up"
            )
        if "m" in parts:
            raise FormatError(f"{parts['m']}: DoRA on SwitchLinear is not an mlx-lm format")
        experts, r = a.shape[0], a.shape[1]
        for e, p in enumerate(expert_paths(path, experts, base_names)):
            m = modules.setdefault(p, LoraModule(p, r=r, alpha=scale * r, scale=scale))
            m.parts["lora_A.weight"] = add(
                f"{PREFIX}{p}.lora_A.weight", a.dtype, a.shape[1:], _rows(parts["lora_a"], e)
            )
            m.parts["lora_B.weight"] = add(
                f"{PREFIX}{p}.lora_B.weight", b.dtype, b.shape[1:], _rows(parts["lora_b"], e)
            )
        return
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != b.shape[0]:
        raise FormatError(
            f"{parts['lora_a']}: factors {list(a.shape)} / {list(b.shape)} do not pair up "
            "(mlx-lm saves lora_a (in, r) and lora_b (r, out))"
        )
    r = a.shape[1]
    m = LoraModule(path, r=r, alpha=scale * r, scale=scale)
    embedding = path.rsplit(".", 1)[-1] in EMBEDDING_LEAVES
    a_part, b_part = (
        ("lora_embedding_A", "lora_embedding_B")
        if embedding
        else ("lora_A.weight", "lora_B.weight")
    )
    m.parts[a_part] = add(
        f"{PREFIX}{path}.{a_part}", a.dtype, a.shape[::-1], transposed(parts["lora_a"])
    )
    m.parts[b_part] = add(
        f"{PREFIX}{path}.{b_part}", b.dtype, b.shape[::-1], transposed(parts["lora_b"])
    )
    if "m" in parts:
        if embedding:
            raise FormatError(
                f"{parts['m']}: mlx-lm embedding DoRA normalises per token row, which has no "
                "PEFT equivalent",
                "merge it with mlx_lm.fuse, or train a LoRA (not DoRA) embedding",
            )
        mag = source.info(parts["m"])
        m.parts["lora_magnitude_vector"] = add(
            f"{PREFIX}{path}.lora_magnitude_vector", mag.dtype, mag.shape, plain(parts["m"])
        )
    modules[path] = m


def layer_index(path: str) -> int | None:
    match = _LAYER_RE.search(path)
    return int(match.group(1)) if match else None


def _peft_config(native: dict[str, Any], modules: dict[str, LoraModule], rank: int) -> dict:
    """The PEFT LoraConfig that loads the same modules with the same effect."""
    scale = native["scale"] or 1.0
    targets, layers = peft_targets(list(modules), native["num_layers"])
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": native.get("model"),
        "r": rank,
        "lora_alpha": scale * rank,
        "lora_dropout": 0.0,
        "use_dora": native["fine_tune_type"] == "dora",
        "use_rslora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "init_lora_weights": True,
        "target_modules": targets,
        "layers_to_transform": layers,
        "layers_pattern": "layers" if layers is not None else None,
        "modules_to_save": None,
    }


def peft_targets(paths: list[str], num_layers: Any) -> tuple[list[str], list[int] | None]:
    """(target_modules, layers_to_transform) selecting exactly ``paths`` in PEFT.

    Block-relative names (``self_attn.q_proj``; PEFT matches list entries as dotted
    suffixes) with the adapted layer indices when mlx's ``num_layers`` limited them;
    modules outside the blocks (embeddings, lm_head) force full paths, since PEFT's
    ``layers_to_transform`` would exclude them.
    """
    inside = {p: layer_index(p) for p in paths}
    if not paths or any(i is None for i in inside.values()):
        return sorted(paths), None
    relative = sorted({_LAYER_RE.split(p, maxsplit=1)[-1] for p in paths})
    limited = isinstance(num_layers, int) and num_layers >= 0
    layers = sorted({i for i in inside.values() if i is not None}) if limited else None
    return relative, layers
