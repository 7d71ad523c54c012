"""Hostile adapter configs, metadata and scales: each case is a real adapter (PEFT's own
save, mlx-lm's, llama.cpp's GGUF converter) or a real quantized base with one field made
hostile, run through every subcommand that reads it. The promise (``assert_refused``):
exit 2, one ``error:`` line naming the file and the field, no traceback, bounded time and
memory, inputs unchanged, nothing at the destination. ``validate`` reports a broken adapter
as a finding (exit 1) rather than an error; it too must name the field, never crash."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import peft_adapter
from eco_helpers import llama_base, llama_cpp_convert_lora, llama_cpp_scripts  # noqa: F401
from hostile_harness import assert_refused, digest, run_cli
from safetensors.torch import load_file, save_file

CONFIG = "adapter_config.json"
# Cases run every reading subcommand for these; the rest run merge and inspect (the two
# entry points of the reader), keeping the suite's time small.
EVERY_COMMAND = {"alpha-nan", "r-string", "deep-nesting", "alpha-inf", "huge-kv-count"}


@pytest.fixture(scope="module", autouse=True)
def _warm_cli() -> None:
    """Import what the CLI imports on its error path in this process, so each forked case
    inherits it (a cold child spends ~2 s importing pydantic via typer, per case)."""
    import gguf  # noqa: F401
    import rich.console  # noqa: F401
    import typer._adapters  # noqa: F401

    import lora_cli.cli  # noqa: F401
    import lora_cli.stages.convert  # noqa: F401
    import lora_cli.stages.inspect  # noqa: F401
    import lora_cli.stages.merge  # noqa: F401
    import lora_cli.stages.validate  # noqa: F401


@pytest.fixture(scope="module")
def peft_dir(llama_base, tmp_path_factory) -> Path:  # noqa: F811
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.bfloat16)
    out = tmp_path_factory.mktemp("peft") / "adapter"
    peft_adapter(model, out, target_modules=["q_proj", "v_proj"])
    (out / "README.md").unlink(missing_ok=True)
    return out


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _with_config(src: Path, dst: Path, edit) -> Path:
    folder = _copy(src, dst)
    config = json.loads((folder / CONFIG).read_text())
    text = edit(config)
    (folder / CONFIG).write_text(text if isinstance(text, str) else json.dumps(config))
    return folder


def _set(**fields):
    return lambda c: c.update(fields)


PEFT_CASES = {
    "alpha-nan": (_set(lora_alpha=float("nan")), "lora_alpha"),
    "alpha-1e39": (_set(lora_alpha=1e39), "lora_alpha"),
    "alpha-string": (_set(lora_alpha="16"), "lora_alpha"),
    "r-string": (_set(r="4"), "r:"),
    "r-null": (_set(r=None), "r:"),
    "r-1e400": (lambda c: json.dumps({**c, "r": 1}).replace('"r": 1', '"r": 1e400'), "r:"),
    "rank-pattern-bad-regex": (_set(rank_pattern={"q_proj(": 2}), "rank_pattern"),
    "rank-pattern-not-int": (_set(rank_pattern={"q_proj": "eight"}), "rank_pattern"),
    "alpha-pattern-inf": (_set(alpha_pattern={"v_proj": float("inf")}), "alpha_pattern"),
    "token-indices-strings": (_set(trainable_token_indices=["a"]), "trainable_token_indices"),
    "bdlora-nblocks-string": (_set(use_bdlora={"nblocks": "a"}), "use_bdlora.nblocks"),
    "target-modules-huge-list": (_set(target_modules=["q"] * 300_000), "target_modules"),
    "deep-nesting": (lambda c: "[" * 100_000 + "]" * 100_000, "nests deeper"),
    "top-level-list": (lambda c: json.dumps([c]), "JSON object"),
    "oversized": (lambda c: json.dumps({**c, "pad": "x" * (17 << 20)}), "byte limit"),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_config_fields_are_refused(case, peft_dir, llama_base, tmp_path) -> None:  # noqa: F811
    edit, field = PEFT_CASES[case]
    adapter = _with_config(peft_dir, tmp_path / "adapter", edit)
    names = [str(adapter / CONFIG), field]
    inputs = [adapter, llama_base]
    out = tmp_path / "merged"
    assert_refused(["merge", llama_base, adapter, "-o", out], inputs, dest=out, names=names)
    assert_refused(["inspect", adapter], inputs, names=names)
    if case not in EVERY_COMMAND:
        return
    gguf = tmp_path / "a.gguf"
    assert_refused(
        ["convert", adapter, "--to", "gguf", "--base", llama_base, "-o", gguf],
        inputs,
        dest=gguf,
        names=names,
    )
    _assert_finding(["validate", adapter], inputs, field)


def _assert_finding(argv, inputs, field: str) -> None:
    """``validate``: exit 1 with a finding naming the field, no traceback, inputs intact."""
    before = digest(inputs)
    outcome = run_cli(argv)
    context = f"{argv}\n{outcome.stdout}\n{outcome.stderr}"
    assert not outcome.timed_out and "Traceback" not in outcome.stderr, context
    assert outcome.code == 1, context
    assert any(field in ln for ln in outcome.stdout.splitlines() if "FINDING" in ln), context
    assert digest(inputs) == before


def test_merged_overflow_is_refused_by_merge_and_validate(peft_dir, llama_base, tmp_path) -> None:  # noqa: F811
    """A finite alpha (3e38, in float32's range) whose scale·B@A overflows bf16: nothing is
    written, and validate's recompute refuses the same way."""
    adapter = _with_config(peft_dir, tmp_path / "adapter", _set(lora_alpha=3e38))
    weights = adapter / "adapter_model.safetensors"
    state = {k: v.clone() * (1000 if "lora_B" in k else 1) for k, v in load_file(weights).items()}
    save_file(state, weights, metadata={"format": "pt"})
    out = tmp_path / "merged"
    names = ["overflows", "self_attn."]
    inputs = [adapter, llama_base]
    assert_refused(["merge", llama_base, adapter, "-o", out], inputs, dest=out, names=names)
    assert_refused(
        ["validate", llama_base, "--base", llama_base, "--adapter", adapter], inputs, names=names
    )


def test_catastrophic_target_modules_regex_is_bounded(peft_dir, tmp_path) -> None:
    """PEFT's ``re.fullmatch('(a|a)*c', name)`` on a 40-character module name is 2⁴⁰ steps:
    refused within the pattern budget, by every command that evaluates the regex."""
    adapter = _with_config(peft_dir, tmp_path / "adapter", _set(target_modules="(a|a)*c"))
    weights = adapter / "adapter_model.safetensors"
    state = load_file(weights)
    first = next(k for k in state if ".q_proj.lora_A" in k)
    module = first.split(".lora_A")[0]
    state = {k.replace(module, "base_model.model." + "a" * 40): v for k, v in state.items()}
    save_file(state, weights, metadata={"format": "pt"})
    names = [str(adapter / CONFIG), "target_modules", "backtracking"]
    out = tmp_path / "converted"
    outcome = assert_refused(["inspect", adapter], [adapter], names=names)
    assert outcome.seconds < 10
    assert_refused(
        ["convert", adapter, "--targets-as-list", "-o", out], [adapter], dest=out, names=names
    )


# -- mlx-lm ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlx_dir(llama_base, tmp_path_factory) -> Path:  # noqa: F811
    pytest.importorskip("mlx_lm")
    from eco_helpers import make_mlx_adapter

    return make_mlx_adapter(llama_base, tmp_path_factory.mktemp("mlx") / "adapters")


def _mlx_params(**fields):
    return lambda c: c["lora_parameters"].update(fields)


MLX_CASES = {
    "params-list": (_set(lora_parameters=[1, 2]), "lora_parameters"),
    "scale-nan": (_mlx_params(scale=float("nan")), "lora_parameters.scale"),
    "scale-inf": (_mlx_params(scale=float("inf")), "lora_parameters.scale"),
    "scale-string": (_mlx_params(scale="2"), "lora_parameters.scale"),
    "rank-float": (_mlx_params(rank=2.5), "lora_parameters.rank"),
}


@pytest.mark.parametrize("case", sorted(MLX_CASES))
def test_mlx_config_fields_are_refused(case, mlx_dir, llama_base, tmp_path) -> None:  # noqa: F811
    edit, field = MLX_CASES[case]
    adapter = _with_config(mlx_dir, tmp_path / "adapters", edit)
    names = [str(adapter / CONFIG), field]
    out = tmp_path / "merged"
    inputs = [adapter, llama_base]
    assert_refused(["merge", llama_base, adapter, "-o", out], inputs, dest=out, names=names)
    assert_refused(["inspect", adapter], inputs, names=names)


# -- GGUF --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_file(peft_dir, llama_base, llama_cpp_scripts, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("gguf") / "adapter.gguf"
    return llama_cpp_convert_lora(llama_cpp_scripts, peft_dir, llama_base, out)


def test_gguf_fixture_is_read_as_a_lora(gguf_file) -> None:
    """The control: the unmodified converter output is read, with its records as the fuzzer
    and the cases below rewrite them."""
    from gguf_records import parse, serialize

    records = parse(gguf_file.read_bytes())
    assert serialize(records) == gguf_file.read_bytes()
    assert run_cli(["inspect", gguf_file]).code == 0


def _gguf_case(name: str, records) -> None:
    from gguf_records import Kv, Tensor

    def kv(key: str, vtype: int, value) -> None:
        records.kvs = [k for k in records.kvs if k.key != key] + [Kv(key, vtype, value)]

    if name == "alpha-inf":
        kv("adapter.lora.alpha", 6, float("inf"))
    elif name == "alpha-string":
        kv("adapter.lora.alpha", 8, "16")
    elif name == "block-x":
        t = records.tensors[0]
        records.tensors[0] = Tensor(t.name.replace("blk.0.", "blk.x."), t.dims, t.type, t.offset)
    elif name == "block-million":
        for i, t in enumerate(records.tensors):
            records.tensors[i] = Tensor(
                t.name.replace("blk.0.", "blk.1000000."), t.dims, t.type, t.offset
            )
    elif name == "rank-zero":
        t = records.tensors[0]
        records.tensors[0] = Tensor(t.name, [t.dims[0], 0], t.type, t.offset)
    elif name == "huge-tensor-count":
        records.tensor_count = 2**62
    elif name == "huge-kv-count":
        records.kv_count = 2**40
    elif name == "huge-string":
        kv("general.name", 8, "x")
        records.string_length_override = ("general.name", 2**50)
    elif name == "array-2-63":
        kv("general.tags", 9, (4, 2**63 - 1))
    elif name == "offset-outside":
        t = records.tensors[-1]
        records.tensors[-1] = Tensor(t.name, t.dims, t.type, 2**40)


GGUF_CASES = {
    "alpha-inf": "adapter.lora.alpha",
    "alpha-string": "adapter.lora.alpha",
    "block-x": "blk.x",
    "block-million": "layers.1000000.",
    "rank-zero": "zero dimension",
    "huge-tensor-count": "tensor count",
    "huge-kv-count": "KV count",
    "huge-string": "general.name",
    "array-2-63": "general.tags",
    "offset-outside": "beyond the file",
    "truncated": "truncated",
}


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_gguf_records_are_refused(case, gguf_file, llama_base, tmp_path) -> None:  # noqa: F811
    from gguf_records import parse, serialize

    hostile = tmp_path / "hostile.gguf"
    data = gguf_file.read_bytes()
    if case == "truncated":
        hostile.write_bytes(data[:200])
    else:
        records = parse(data)
        _gguf_case(case, records)
        hostile.write_bytes(serialize(records))
    names = [str(hostile), GGUF_CASES[case]]
    out = tmp_path / "merged"
    inputs = [hostile, llama_base]
    if case == "block-million":  # bounded: refused for want of a base tensor, no MemoryError
        names = ["layers.1000000."]
        assert_refused(["merge", llama_base, hostile, "-o", out], inputs, dest=out, names=names)
        return
    assert_refused(["merge", llama_base, hostile, "-o", out], inputs, dest=out, names=names)
    assert_refused(["inspect", hostile], inputs, names=names)
    if case not in EVERY_COMMAND:
        return
    peft_out = tmp_path / "peft"
    assert_refused(
        ["convert", hostile, "--to", "peft", "-o", peft_out], inputs, dest=peft_out, names=names
    )


def test_gguf_million_blocks_inspects_in_bounded_memory(gguf_file, tmp_path) -> None:
    """``blk.1000000``: name tables are built for the blocks present only."""
    from gguf_records import Tensor, parse, serialize

    records = parse(gguf_file.read_bytes())
    records.tensors = [
        Tensor(t.name.replace("blk.0.", "blk.1000000."), t.dims, t.type, t.offset)
        for t in records.tensors
    ]
    hostile = tmp_path / "million.gguf"
    hostile.write_bytes(serialize(records))
    outcome = run_cli(["inspect", hostile, "--json"], memory_mb=512)
    assert outcome.code == 0 and "Traceback" not in outcome.stderr, outcome.stderr
    modules = json.loads(outcome.stdout)["adapter"]["modules"]
    assert any("layers.1000000." in m["name"] for m in modules)


# -- quantized bases ----------------------------------------------------------------------

Q_PROJ = "model.layers.0.self_attn.q_proj"


def _quantized_base(base: Path, out: Path, replace: dict, qc: dict) -> Path:
    out.mkdir()
    state = load_file(base / "model.safetensors")
    state.pop(f"{Q_PROJ}.weight")
    state.update(replace)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(config))
    return out


def _fp8(scale: float, block=(128, 128)) -> tuple[dict, dict]:
    w = torch.zeros(32, 32).to(torch.float8_e4m3fn)
    return (
        {f"{Q_PROJ}.weight": w, f"{Q_PROJ}.weight_scale_inv": torch.full((1, 1), scale)},
        {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)},
    )


def _int4(shape: list[int], scale: float = 1.0) -> tuple[dict, dict]:
    return (
        {
            f"{Q_PROJ}.weight_packed": torch.zeros(32, 4, dtype=torch.int32),
            f"{Q_PROJ}.weight_scale": torch.full((32, 1), scale, dtype=torch.bfloat16),
            f"{Q_PROJ}.weight_shape": torch.tensor(shape),
        },
        {"quant_method": "compressed-tensors", "format": "pack-quantized"},
    )


QUANT_CASES = {
    "fp8-scale-nan": (lambda: _fp8(float("nan")), "weight_scale_inv"),
    "fp8-scale-inf": (lambda: _fp8(float("inf")), "weight_scale_inv"),
    "block-size-zero": (lambda: _fp8(1.0, (0, 128)), "weight_block_size"),
    "block-size-string": (lambda: _fp8(1.0, ("a", 128)), "weight_block_size"),
    "int4-shape-3": (lambda: _int4([32, 32, 1]), "weight_shape"),
    "int4-rows-short": (lambda: _int4([64, 32]), "weight_shape"),
    "int4-scale-nan": (lambda: _int4([32, 32], float("nan")), "weight_scale"),
}


@pytest.mark.parametrize("case", sorted(QUANT_CASES))
def test_quantized_metadata_is_refused(case, peft_dir, llama_base, tmp_path) -> None:  # noqa: F811
    make, field = QUANT_CASES[case]
    tensors, qc = make()
    base = _quantized_base(llama_base, tmp_path / "base", tensors, qc)
    out = tmp_path / "merged"
    inputs = [base, peft_dir]
    assert_refused(["merge", base, peft_dir, "-o", out], inputs, dest=out, names=[field])


def test_mxfp4_blocks_not_4d_are_refused(peft_dir, llama_base, tmp_path) -> None:  # noqa: F811
    experts = "model.layers.0.mlp.experts.gate_up_proj"
    tensors = {
        f"{Q_PROJ}.weight": load_file(llama_base / "model.safetensors")[f"{Q_PROJ}.weight"],
        f"{experts}_blocks": torch.zeros(2, 8, 16, dtype=torch.uint8),
        f"{experts}_scales": torch.full((2, 8), 127, dtype=torch.uint8),
    }
    base = _quantized_base(llama_base, tmp_path / "base", tensors, {"quant_method": "mxfp4"})
    out = tmp_path / "merged"
    names = [f"{experts}_blocks", "MXFP4"]
    inputs = [base, peft_dir]
    assert_refused(["merge", base, peft_dir, "-o", out], inputs, dest=out, names=names)
    assert_refused(["inspect", base], inputs, names=names)
