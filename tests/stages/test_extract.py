"""``lora extract``: the maths against an independent SVD, round trips through PEFT-made
adapters merged by PEFT, PEFT loading the output, and refusals.

Models are tiny transformers models built at test time; adapters come from PEFT itself
(non-zero B) and TUNED from PEFT's own ``merge_and_unload``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import dtype_kw, load_owned, peft_adapter, save_model, tiny_model
from tests.hostile_harness import assert_refused

PREFIX = "base_model.model."


def _extract(run_cli, base: Path, tuned: Path, out: Path, *args: str) -> dict:
    code, stdout, stderr = run_cli("extract", base, tuned, "-o", out, "--json", *args)
    assert code == 0, stderr
    return json.loads(stdout)


def _tuned_from(base_model, folder: Path, deltas: dict[str, torch.Tensor]) -> Path:
    """A 'full fine-tune': BASE's weights plus the given per-tensor changes."""
    import copy

    model = copy.deepcopy(base_model)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, d in deltas.items():
            params[name].add_(d.to(params[name].dtype))
    return save_model(model, folder)


def _spectrum_delta(shape, decay: float, seed: int) -> torch.Tensor:
    """A full-rank change with singular values decay**i (1.0 for a flat spectrum)."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = decay ** torch.arange(k, dtype=torch.float32)
    return 0.05 * (u * s) @ v.T


@pytest.fixture(scope="module")
def fp32_pair(tmp_path_factory):
    """An fp32 Llama and a fine-tune whose linear weights changed with a decaying spectrum
    (q_proj: a flat one), plus a changed final norm."""
    root = tmp_path_factory.mktemp("pair")
    model = tiny_model("llama", torch.float32)
    base = save_model(model, root / "base")
    deltas = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        if p.ndim == 2 and "layers." in name:
            deltas[name] = _spectrum_delta(p.shape, 1.0 if "q_proj" in name else 0.6, i)
    deltas["model.norm.weight"] = torch.full((32,), 0.01)
    return model, base, _tuned_from(model, root / "tuned", deltas), deltas


def _optimal_error(delta: torch.Tensor, r: int) -> float:
    s = torch.linalg.svd(delta.double(), full_matrices=False).S
    return float((s[r:] ** 2).sum().sqrt() / (s**2).sum().sqrt())


def test_exact_error_is_eckart_young(fp32_pair, tmp_path, run_cli):
    model, base, tuned, deltas = fp32_pair
    doc = _extract(
        run_cli, base, tuned, tmp_path / "out", "--rank", "4", "--exact", "--dtype", "fp32"
    )
    by_module = {m["module"]: m for m in doc["modules"]}
    projections = {n.removesuffix(".weight") for n in deltas if n.endswith("proj.weight")}
    assert set(by_module) == projections
    for name, d in deltas.items():
        if name.endswith("norm.weight"):
            continue
        m = by_module[name.removesuffix(".weight")]
        assert m["rank"] == 4
        assert m["error"] == pytest.approx(_optimal_error(d, 4), rel=1e-4, abs=1e-5), name
    assert doc["modules_to_save"] == ["model.norm"]
    assert doc["unchanged"] > 0  # embeddings, head, layer norms


def test_randomized_svd_near_optimal_on_decaying_spectra(fp32_pair, tmp_path, run_cli):
    _, base, tuned, deltas = fp32_pair
    doc = _extract(run_cli, base, tuned, tmp_path / "out", "--rank", "4", "--dtype", "fp32")
    written = load_owned(tmp_path / "out" / "adapter_model.safetensors")
    for m in doc["modules"]:
        d = deltas[m["module"] + ".weight"]
        a = written[f"{PREFIX}{m['module']}.lora_A.weight"]
        b = written[f"{PREFIX}{m['module']}.lora_B.weight"]
        measured = float(torch.linalg.norm(d - b @ a) / torch.linalg.norm(d))
        assert m["error"] == pytest.approx(measured, rel=1e-3, abs=1e-5)  # reported honestly
        best = _optimal_error(d, 4)
        assert measured >= best * (1 - 1e-4)
        if "q_proj" not in m["module"]:  # decaying spectrum: within 1 % of the optimum
            assert measured <= best * 1.01, m


def test_rank_auto_writes_patterns_peft_reads(fp32_pair, tmp_path, run_cli):
    from peft import PeftConfig

    _, base, tuned, deltas = fp32_pair
    out = tmp_path / "out"
    doc = _extract(
        run_cli,
        base,
        tuned,
        out,
        "--rank",
        "auto",
        "--energy",
        "0.9",
        "--max-rank",
        "6",
        "--exact",
        "--dtype",
        "fp32",
    )
    cfg = PeftConfig.from_pretrained(out)
    ranks = {m["module"]: m["rank"] for m in doc["modules"]}
    assert max(ranks.values()) == 6  # the flat q_proj spectra hit the cap
    assert min(ranks.values()) < 6
    for module, r in ranks.items():
        s = torch.linalg.svd(deltas[module + ".weight"].double()).S
        kept = torch.cumsum(s**2, 0) / (s**2).sum()
        want = min(int((kept < 0.9 - 1e-9).sum()) + 1, 6)
        assert r == want, module
        from peft.utils.other import get_pattern_key  # PEFT's own rule, as it loads

        ranks_, alphas = cfg.rank_pattern or {}, cfg.alpha_pattern or {}
        got = ranks_.get(get_pattern_key(ranks_, module), cfg.r)
        alpha = alphas.get(get_pattern_key(alphas, module), cfg.lora_alpha)
        assert (got, alpha) == (r, r)


def _peft_merge(base_dir: Path, adapter: Path, dtype=torch.bfloat16) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = AutoModelForCausalLM.from_pretrained(base_dir, **dtype_kw(dtype))
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        return {k: v.detach().clone() for k, v in merged.state_dict().items()}
    finally:
        torch.set_num_threads(threads)


def merge_equals_peft(run_cli, base: Path, adapter: Path, dest: Path, oracle=None) -> dict:
    """`lora merge BASE ADAPTER` equals PEFT's merge_and_unload of it bit for bit (PEFT
    pinned to the merge's threads: tests/peft_oracle.py); returns our merged tensors."""
    code, _, stderr = run_cli("merge", base, adapter, "-o", dest, "-q")
    assert code == 0, stderr
    ours = load_owned(dest / "model.safetensors")
    oracle = _peft_merge(base, adapter) if oracle is None else oracle
    assert ours.keys() <= oracle.keys()
    for name, value in ours.items():
        assert torch.equal(value, oracle[name]), name
    return ours


ROUND_TRIPS = {
    "plain": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "rslora": ("llama", dict(target_modules=["k_proj", "o_proj"], use_rslora=True)),
    "patterns": (
        "llama",
        dict(
            target_modules=["q_proj", "up_proj"],
            rank_pattern={"up_proj": 2},
            alpha_pattern={"q_proj": 3.0},
        ),
    ),
    "embedding": ("llama", dict(target_modules=["embed_tokens", "gate_proj"])),
    "gpt2-conv1d": ("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_round_trip_through_peft(case, tmp_path, run_cli):
    """extract(BASE, PEFT-merge(BASE, A)) at A's rank; PEFT's merge of it gives TUNED back
    within bf16 rounding of the operands (1 ulp)."""
    kind, lora = ROUND_TRIPS[case]
    model = tiny_model(kind)
    base = save_model(model, tmp_path / "base")
    peft_adapter(model, tmp_path / "a", **lora)
    tuned_state = _peft_merge(base, tmp_path / "a")
    from transformers import AutoModelForCausalLM

    tuned_model = AutoModelForCausalLM.from_pretrained(base, **dtype_kw(torch.bfloat16))
    tuned_model.load_state_dict(tuned_state)
    tuned = save_model(tuned_model, tmp_path / "tuned")
    rank = max([4, *lora.get("rank_pattern", {}).values()])
    doc = _extract(
        run_cli, base, tuned, tmp_path / "out", "--rank", str(rank), "--exact", "--dtype", "fp32"
    )
    assert doc["modules"], doc
    assert doc["modules_to_save"] == [] and doc["dropped"] == []
    again = _peft_merge(base, tmp_path / "out")
    start = model.state_dict()
    for name, want in tuned_state.items():
        got, want, w = again[name].float(), want.float(), start[name].float()
        # TUNED's bf16 rounding (of the sum, and of the delta where PEFT rounds it first:
        # embeddings) is full-rank noise no rank-r product keeps: the re-merge lands within
        # that rounding's size of TUNED, as a whole tensor
        rounding = torch.finfo(torch.bfloat16).eps * (want.norm() + (want - w).norm())
        assert (got - want).norm() <= rounding, name
    merge_equals_peft(run_cli, base, tmp_path / "out", tmp_path / "merged", again)
    if case == "embedding":
        keys = load_owned(tmp_path / "out" / "adapter_model.safetensors")
        assert f"{PREFIX}model.embed_tokens.lora_embedding_A" in keys
    if case == "gpt2-conv1d":
        cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
        assert cfg["fan_in_fan_out"] is True


@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory):
    """A bf16 Qwen2 (biased q/k/v) fine-tuned in full: every projection, a q bias and the
    final norm changed."""
    root = tmp_path_factory.mktemp("qwen")
    model = tiny_model("qwen2")
    base = save_model(model, root / "base")
    deltas = {}
    g = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():
        if p.ndim == 2 and "layers." in name:
            deltas[name] = (
                0.02
                * torch.randn(p.shape[0], 3, generator=g)
                @ torch.randn(3, p.shape[1], generator=g)
            )
    deltas["model.layers.0.self_attn.q_proj.bias"] = torch.full((32,), 0.05)
    deltas["model.norm.weight"] = torch.full((32,), 0.02)
    return model, base, _tuned_from(model, root / "tuned", deltas)


def test_peft_loads_output_logits_match_and_merge_is_bit_identical(qwen_pair, tmp_path, run_cli):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, base, tuned = qwen_pair
    out = tmp_path / "out"
    doc = _extract(run_cli, base, tuned, out, "--rank", "3")
    assert doc["lora_biases"] == ["model.layers.0.self_attn.q_proj.bias"]
    assert doc["modules_to_save"] == ["model.norm"]
    assert doc["totals"]["max_error"] < 0.02  # rank-3 changes, bf16 factors
    ids = torch.arange(16).reshape(2, 8)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tuned, **dtype_kw(torch.float32))(ids).logits
        base_model = AutoModelForCausalLM.from_pretrained(base, **dtype_kw(torch.float32))
        got = PeftModel.from_pretrained(base_model, out)(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base, **dtype_kw(torch.float32))(ids).logits
    assert (got - want).abs().max() < 0.05 * (plain - want).abs().max()
    merge_equals_peft(run_cli, base, out, tmp_path / "merged")


def test_validate_tuned_gates_on_max_error(qwen_pair, tmp_path, run_cli):
    _, base, tuned = qwen_pair
    out = tmp_path / "out"
    _extract(run_cli, base, tuned, out, "--rank", "1", "--no-include-full")
    code, stdout, _ = run_cli("validate", out, "--base", base, "--tuned", tuned, "--json")
    doc = json.loads(stdout)
    assert code == 0 and doc["valid"], doc
    errors = {t["tensor"]: t["error"] for t in doc["tensors"]}
    assert errors["model.norm.weight"] == pytest.approx(1.0)  # dropped: the change is lost
    assert 0.05 < errors["model.layers.1.mlp.up_proj.weight"] < 1.0  # rank 1 of 3
    assert errors["model.embed_tokens.weight"] == 0.0
    code, stdout, _ = run_cli(
        "validate", out, "--base", base, "--tuned", tuned, "--max-error", "0.5"
    )
    assert code == 1
    assert "FINDING model.norm.weight" in stdout


def test_no_include_full_lists_dropped_and_min_change_skips(qwen_pair, tmp_path, run_cli):
    _, base, tuned = qwen_pair
    doc = _extract(run_cli, base, tuned, tmp_path / "a", "--no-include-full")
    assert sorted(doc["dropped"]) == ["model.layers.0.self_attn.q_proj.bias", "model.norm.weight"]
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] is None and cfg["bias"] == "none"
    assert cfg["lora_alpha"] == cfg["r"] == 32  # the default rank, scale 1
    small = {k: 16 for k in ("k_proj", "v_proj")}  # 16 outputs: the rank is capped there
    assert cfg["rank_pattern"] == {
        rf"model\.layers\.{i}\.self_attn\.{k}": r for i in (0, 1) for k, r in small.items()
    }
    assert cfg["alpha_pattern"] == cfg["rank_pattern"]
    doc = _extract(run_cli, base, tuned, tmp_path / "b", "--min-change", "0.05")
    assert doc["below_min_change"] == 1  # the norm's 2 % change
    assert doc["modules_to_save"] == [] and doc["lora_biases"]


def test_output_folder_card_and_manifest(qwen_pair, tmp_path, run_cli):
    import hashlib

    _, base, tuned = qwen_pair
    out = tmp_path / "out"
    doc = _extract(run_cli, base, tuned, out, "--rank", "2")
    assert doc["files"] == sorted(
        ["README.md", "adapter_config.json", "adapter_model.safetensors", "lora-checksums.sha256"]
    )
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card
    for line in (out / "lora-checksums.sha256").read_text().splitlines():
        digest, name = line.split("  ")
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base)
    assert cfg["target_modules"] == sorted(m["module"] for m in doc["modules"])
    assert doc["totals"]["adapter_bytes"] < doc["totals"]["tuned_bytes"]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_tied_embedding_extracted_once(tmp_path, run_cli):
    model = tiny_model("llama-tied")
    base = save_model(model, tmp_path / "base")
    delta = {"model.embed_tokens.weight": _spectrum_delta((64, 32), 0.5, 3)}
    tuned = _tuned_from(model, tmp_path / "tuned", delta)
    doc = _extract(run_cli, base, tuned, tmp_path / "out", "--rank", "4")
    assert [m["module"] for m in doc["modules"]] == ["model.embed_tokens"]
    assert any("tied" in n and "once" in n for n in doc["notes"])


def test_dry_run_lists_targets(qwen_pair, tmp_path, run_cli):
    _, base, tuned = qwen_pair
    code, stdout, stderr = run_cli("extract", base, tuned, "--dry-run", "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    kinds = {m["tensor"]: m["kind"] for m in doc["low_rank"]}
    assert kinds["model.embed_tokens.weight"] == "embedding"
    assert kinds["lm_head.weight"] == "linear"
    assert "model.norm.weight" in doc["other"]


# -- refusals: one line, exit 2, nothing written ----------------------------------------
def test_refuses_other_model_size(qwen_pair, tmp_path):
    _, base, _ = qwen_pair
    other = save_model(tiny_model("qwen2", intermediate_size=64), tmp_path / "other")
    out = tmp_path / "out"
    assert_refused(
        ["extract", base, other, "-o", out], [base, other], dest=out, names=["mlp.", "shape"]
    )


def test_refuses_missing_tensor_either_side(qwen_pair, tmp_path):
    from safetensors.torch import save_file

    _, base, tuned = qwen_pair
    state = load_owned(tuned / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    short = tmp_path / "short"
    short.mkdir()
    save_file(state, short / "model.safetensors", metadata={"format": "pt"})
    (short / "config.json").write_text((tuned / "config.json").read_text())
    out = tmp_path / "out"
    assert_refused(
        ["extract", base, short, "-o", out],
        [base, short],
        dest=out,
        names=["model.layers.1.mlp.up_proj.weight", "TUNED"],
    )
    assert_refused(
        ["extract", short, base, "-o", out],
        [base, short],
        dest=out,
        names=["model.layers.1.mlp.up_proj.weight", "BASE"],
    )


def test_refuses_grown_vocabulary_unless_include_full(qwen_pair, tmp_path, run_cli):
    _, base, _ = qwen_pair
    grown = save_model(tiny_model("qwen2", vocab_size=72), tmp_path / "grown")
    out = tmp_path / "out"
    assert_refused(
        ["extract", base, grown, "-o", out],
        [base, grown],
        dest=out,
        names=["vocabulary grew from 64 to 72", "--include-full"],
    )
    doc = _extract(run_cli, base, grown, out, "--include-full")
    assert "model.embed_tokens" in doc["modules_to_save"]
    assert "lm_head" in doc["modules_to_save"]
    code, stdout, _ = run_cli("validate", out, "--base", base, "--tuned", grown, "--json")
    errors = {t["tensor"]: t["error"] for t in json.loads(stdout)["tensors"]}
    assert code == 0 and errors["model.embed_tokens.weight"] == 0.0  # shipped whole


def test_refuses_identical_models(qwen_pair, tmp_path):
    _, base, _ = qwen_pair
    out = tmp_path / "out"
    assert_refused(
        ["extract", base, base, "-o", out], [base], dest=out, names=["nothing to extract"]
    )


def test_round_trip_conv_kernels_through_peft(tmp_path, run_cli):
    """Whisper's encoder convolutions (Conv1d, kernel 3): extracted via the flattened kernel
    into PEFT's conv LoRA layout, which PEFT merges back to TUNED."""
    from peft import PeftModel
    from transformers import WhisperConfig, WhisperModel

    config = WhisperConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8,
        max_source_positions=16, max_target_positions=16, vocab_size=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = WhisperModel(config).to(torch.bfloat16).eval()
    base = save_model(model, tmp_path / "base")
    peft_model = peft_adapter(model, tmp_path / "a", target_modules=["conv1", "conv2", "fc1"])
    tuned_model = peft_model.merge_and_unload()
    tuned = save_model(tuned_model, tmp_path / "tuned")
    doc = _extract(run_cli, base, tuned, tmp_path / "out", "--rank", "4", "--exact",
                   "--dtype", "fp32")  # fmt: skip
    kinds = {m["module"]: m["kind"] for m in doc["modules"]}
    assert kinds["encoder.conv1"] == kinds["encoder.conv2"] == "conv"
    again = PeftModel.from_pretrained(
        WhisperModel.from_pretrained(base, **dtype_kw(torch.bfloat16)), tmp_path / "out"
    ).merge_and_unload()
    start, want_state = model.state_dict(), tuned_model.state_dict()
    for name, got in again.state_dict().items():
        got, want, w = got.float(), want_state[name].float(), start[name].float()
        rounding = torch.finfo(torch.bfloat16).eps * (want.norm() + (want - w).norm())
        assert (got - want).norm() <= rounding, name


def test_pickled_tuned_through_the_safe_unpickler(qwen_pair, tmp_path, run_cli):
    """A ``pytorch_model.bin`` TUNED (read without running pickle code) gives the same
    adapter bytes as its safetensors twin: same reader, seeded SVD."""
    from transformers import AutoModelForCausalLM

    _, base, tuned = qwen_pair
    model = AutoModelForCausalLM.from_pretrained(tuned, **dtype_kw(torch.bfloat16))
    pickled = save_model(model, tmp_path / "pickled", safe=False)
    a = _extract(run_cli, base, tuned, tmp_path / "a", "--rank", "2")
    b = _extract(run_cli, base, pickled, tmp_path / "b", "--rank", "2")
    assert a["modules"] == b["modules"]
    weights = "adapter_model.safetensors"
    assert (tmp_path / "a" / weights).read_bytes() == (tmp_path / "b" / weights).read_bytes()


def test_fp8_block_base_is_dequantized(qwen_pair, tmp_path, run_cli):
    """An FP8-block BASE is read through the merge's codecs: TUNED made from its dequantized
    values (q·s, written out here) plus rank-3 changes comes back at rank 3."""
    from tests.quant_helpers import fp8_block_base

    model, bf16_base, _ = qwen_pair
    fp8 = fp8_block_base(bf16_base, tmp_path / "fp8")
    raw = {}
    for shard in sorted(fp8.glob("*.safetensors")):
        raw.update(load_owned(shard))
    g = torch.Generator().manual_seed(11)
    deltas = {}
    for name, p in model.named_parameters():
        if name + "_scale_inv" in raw:  # one 128×128 block covers these small weights
            dequantized = (raw[name].float() * raw[name + "_scale_inv"][0, 0]).to(p.dtype)
            change = 0.02 * torch.randn(p.shape[0], 3, generator=g)
            deltas[name] = (
                dequantized.float() - p.float() + change @ torch.randn(3, p.shape[1], generator=g)
            )
    tuned = _tuned_from(model, tmp_path / "tuned", deltas)
    doc = _extract(run_cli, fp8, tuned, tmp_path / "out", "--rank", "3")
    assert {m["module"] + ".weight" for m in doc["modules"]} == set(deltas)
    assert doc["totals"]["max_error"] < 0.02, doc["worst"]


def test_moe_attention_only_fine_tune_extracts_no_experts(tmp_path, run_cli):
    """Mixtral on disk keeps per-expert weights that transformers fuses on load: a fine-tune
    of the attention alone extracts the attention and no target_parameters (the fused
    experts' own round trips: test_extract_experts.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "mixtral", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=64, num_local_experts=2,
        num_experts_per_tok=1, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, **dtype_kw(torch.bfloat16))
    base = save_model(model, tmp_path / "base")
    q = _spectrum_delta((32, 32), 0.5, 1)
    attention = _tuned_from(model, tmp_path / "attn", {"model.layers.0.self_attn.q_proj.weight": q})
    doc = _extract(run_cli, base, attention, tmp_path / "out", "--rank", "4")
    assert [m["module"] for m in doc["modules"]] == ["model.layers.0.self_attn.q_proj"]
    assert doc["unchanged"] > 6  # the six per-expert tensors among them
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert "target_parameters" not in cfg


def test_hub_id_base_names_the_adapters_base(qwen_pair, tmp_path, monkeypatch, run_cli):
    """BASE as a Hub id (resolved offline from a real cache layout): the adapter's config and
    card name that id, never the cache folder, and PEFT's loader reads the config."""
    from peft import PeftConfig

    from tests.hub_helpers import COMMIT, add_to_cache, go_offline

    _, base, tuned = qwen_pair
    cache = tmp_path / "cache"
    add_to_cache(cache, "tiny-org/qwen-base", base, COMMIT)
    go_offline(monkeypatch, cache)
    out = tmp_path / "out"
    _extract(run_cli, "tiny-org/qwen-base", tuned, out, "--rank", "2")
    assert PeftConfig.from_pretrained(out).base_model_name_or_path == "tiny-org/qwen-base"
    card = (out / "README.md").read_text()
    assert 'base_model: "tiny-org/qwen-base"\nbase_model_relation: adapter' in card
