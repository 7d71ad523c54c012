"""`lora merge BASE A1 A2 … --weights`: against PEFT's add_weighted_adapter("cat") +
merge_and_unload(), the unmerged multi-adapter PeftModel's logits, and PEFT's refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import peft_adapter, peft_merged_state, save_model, tiny_model, ulp_diff
from test_merge_modules import VisionLM
from test_merge_vs_peft import IDS, assert_matches_peft, logits, merged_tensors

from lora_cli.errors import MergeError
from lora_cli.stages.merge import merge

# Different module sets, ranks, rank_pattern, rslora on the second; both adapt the embedding.
FIRST = dict(target_modules=["q_proj", "v_proj", "embed_tokens"], r=4, lora_alpha=8)
SECOND = dict(
    target_modules=["q_proj", "down_proj", "embed_tokens"],
    r=2,
    lora_alpha=3,
    rank_pattern={"down_proj": 3},
    use_rslora=True,
)
WEIGHTS = [0.7, -0.3]


def perturb(adapter_dir: Path, part: str, seed: int = 7) -> None:
    """Make the saved full tensors whose key contains ``part`` differ from the base's."""
    from safetensors.torch import load_file, save_file

    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    torch.manual_seed(seed)
    hits = [k for k in tensors if part in k]
    assert hits, sorted(tensors)
    for k in hits:
        tensors[k] = tensors[k] + 0.05 * torch.randn_like(tensors[k])
    save_file(tensors, path, metadata={"format": "pt"})


def peft_cat_state(base_dir, adapters: list[Path], weights, dtype, *, fp32=True) -> dict:
    """PEFT: load every adapter, add_weighted_adapter(combination_type="cat"), merge.

    ``fp32``: keep the combined adapter in fp32 like every adapter PEFT loads
    (``autocast_adapter_dtype``) and its scale at 1 (PEFT 0.21.2 inherits the first
    adapter's use_rslora, peft#3761). PEFT's own ``cat`` adapter takes the base dtype, so
    on a bf16/fp16 base it rounds the factors and the delta once more.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    if isinstance(base_dir, torch.nn.Module):  # a plain module: a fresh copy of it
        model = copy.deepcopy(base_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    pm = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], 1):
        pm.load_adapter(path, adapter_name=f"a{i}")
    tuner = pm.base_model
    if fp32:
        inject = tuner.inject_adapter

        def inject_fp32(model, adapter_name, **kwargs):
            inject(model, adapter_name, **kwargs)
            tuner._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=True)

        tuner.inject_adapter = inject_fp32
    names = [f"a{i}" for i in range(len(adapters))]
    pm.add_weighted_adapter(names, list(weights), "mix", combination_type="cat")
    if fp32:
        for m in pm.modules():
            if isinstance(m, LoraLayer) and "mix" in m.scaling:
                m.scaling["mix"] = 1.0
    pm.set_adapter("mix")
    return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


def build_two_adapters(root: Path, dtype: torch.dtype):
    model = tiny_model("llama", dtype)
    base_dir = save_model(model, root / "base")
    peft_adapter(model, root / "a0", **FIRST)
    peft_adapter(model, root / "a1", **SECOND)
    return dtype, model, base_dir, [root / "a0", root / "a1"]


@pytest.fixture(scope="module", params=["float32", "float16", "bfloat16"])
def two_adapters(request, tmp_path_factory):
    """The numerics, in every floating point dtype a base comes in."""
    root = tmp_path_factory.mktemp(f"several-{request.param}")
    return build_two_adapters(root, getattr(torch, request.param))


@pytest.fixture(scope="module")
def bf16_adapters(tmp_path_factory):
    """The plumbing (CLI, streaming, reads), in one dtype."""
    return build_two_adapters(tmp_path_factory.mktemp("several-cli"), torch.bfloat16)


def test_weighted_merge_equals_peft_cat(tmp_path: Path, two_adapters) -> None:
    dtype, model, base_dir, adapters = two_adapters
    result = merge(base_dir, adapters, tmp_path / "out", weights=WEIGHTS, device="cpu")
    expected = [{"path": str(a), "weight": w} for a, w in zip(adapters, WEIGHTS, strict=True)]
    assert result.adapters == expected
    ours = merged_tensors(tmp_path / "out")
    base = model.state_dict()
    theirs = peft_cat_state(base_dir, adapters, WEIGHTS, dtype)
    # embed, q_proj ×2 (both adapters), v_proj ×2 (first), down_proj ×2 (second)
    assert_matches_peft(ours, theirs, base, changed_min=7)
    # both adapters count on a shared module: the first alone gives something else
    merge(base_dir, adapters[:1], tmp_path / "first", weights=WEIGHTS[:1], device="cpu")
    first = merged_tensors(tmp_path / "first")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(first[q], ours[q])
    if dtype == torch.float32:  # PEFT's own `cat`, unpatched, on an fp32 base
        literal = peft_cat_state(base_dir, adapters, WEIGHTS, dtype, fp32=False)
        assert_matches_peft(ours, literal, base, changed_min=7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_and_embedding_modules_equal_peft_cat(tmp_path: Path, dtype) -> None:
    """Conv1d/Conv2d (3×3 and 1×1), Embedding and Linear LoRAs of two adapters on a plain
    module state dict (no config.json), against PEFT's cat of the same adapters."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = VisionLM().to(dtype).eval()
    (tmp_path / "base").mkdir()
    save_file(model.state_dict(), tmp_path / "base" / "model.safetensors")
    targets = (["patch", "pointwise", "temporal", "embed", "block"], ["patch", "temporal",
               "projector", "embed", "head"])  # fmt: skip
    adapters = [tmp_path / "a0", tmp_path / "a1"]
    for seed, (path, target, r) in enumerate(zip(adapters, targets, (4, 2), strict=True)):
        torch.manual_seed(seed + 1)
        cfg = LoraConfig(r=r, lora_alpha=6, target_modules=target, init_lora_weights=False)
        get_peft_model(copy.deepcopy(model), cfg).save_pretrained(path)
    merge(tmp_path / "base", adapters, tmp_path / "out", weights=[0.6, 1.5], device="cpu")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    theirs = peft_cat_state(model, adapters, [0.6, 1.5], dtype)
    assert_matches_peft(ours, theirs, model.state_dict(), changed_min=7)  # the union


def test_dtype_option_merges_in_the_output_dtype(tmp_path: Path, two_adapters) -> None:
    """``--dtype fp32`` on a half-precision base: like PEFT on the base loaded in fp32."""
    dtype, model, base_dir, adapters = two_adapters
    if dtype == torch.float32:
        pytest.skip("the base is fp32 already")
    merge(base_dir, adapters, tmp_path / "out", weights=WEIGHTS, dtype="fp32", device="cpu")
    ours = merged_tensors(tmp_path / "out")
    assert {t.dtype for t in ours.values()} == {torch.float32}
    base = {k: v.float() for k, v in model.state_dict().items()}
    theirs = peft_cat_state(base_dir, adapters, WEIGHTS, torch.float32)
    assert_matches_peft(ours, theirs, base, changed_min=7)


def test_row_blocks_give_the_same_bytes(tmp_path: Path, monkeypatch, bf16_adapters) -> None:
    import lora_cli.merge.run as run

    _, _, base_dir, adapters = bf16_adapters
    merge(base_dir, adapters, tmp_path / "whole", weights=WEIGHTS, device="cpu")
    monkeypatch.setattr(run, "BLOCK_BYTES", 100)
    blocks: list[int] = []
    real = run.row_blocks
    monkeypatch.setattr(
        run, "row_blocks", lambda p, a: blocks.append(len(real(p, a) or [])) or real(p, a)
    )
    merge(base_dir, adapters, tmp_path / "blocks", weights=WEIGHTS, device="cpu")
    assert max(blocks) > 1
    whole, got = merged_tensors(tmp_path / "whole"), merged_tensors(tmp_path / "blocks")
    for name, t in whole.items():
        assert torch.equal(t.view(torch.uint8), got[name].view(torch.uint8)), name


def test_each_base_tensor_is_read_once(tmp_path: Path, monkeypatch, bf16_adapters) -> None:
    """One pass: every tensor some adapter touches is read from the base exactly once
    (untouched ones are copied file-to-file), whatever the number of adapters."""
    from lora_cli.io.reader import TensorSource

    _, _, base_dir, adapters = bf16_adapters
    reads: list[str] = []
    real = TensorSource.read

    def spy(self, name, *args, **kwargs):
        if self.root == base_dir:
            reads.append(name)
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(TensorSource, "read", spy)
    result = merge(base_dir, adapters, tmp_path / "out", weights=WEIGHTS, device="cpu")
    assert result.counts["merge"] == 7
    # the embedding starts from the copy PEFT saves beside an embedding LoRA
    assert len(reads) == len(set(reads)) == 6, sorted(reads)
    assert all(n.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")) for n in reads)


def test_one_adapter_with_a_weight_scales_its_delta(tmp_path: Path) -> None:
    """``--weights 0.5`` on one adapter: the unmerged PeftModel with every scale halved."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", torch.float32)
    base_dir = save_model(model, tmp_path / "base")
    peft_adapter(model, tmp_path / "a", target_modules=["q_proj", "v_proj", "embed_tokens"])
    merge(base_dir, [tmp_path / "a"], tmp_path / "out", weights=[0.5], device="cpu")
    pm = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), tmp_path / "a"
    )
    full = logits(pm.eval())
    for m in pm.modules():
        if isinstance(m, LoraLayer):
            m.scaling["default"] *= 0.5
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert not torch.allclose(logits(pm), full, atol=1e-3)
    torch.testing.assert_close(logits(merged), logits(pm), atol=2e-4, rtol=1e-4)


def unmerged_logits(base_dir: Path, adapters: list[Path]) -> torch.Tensor:
    """Every adapter active at once, unmerged: the sum the merge must reproduce."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], 1):
        pm.load_adapter(path, adapter_name=f"a{i}")
    pm.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    return logits(pm.eval())


@pytest.mark.parametrize(
    "kind, second",
    [
        ("llama", ["q_proj", "o_proj"]),
        ("llama-tied", ["q_proj", "o_proj"]),
        ("llama-tied", ["embed_tokens", "o_proj"]),  # each adapter on one side of the tie
    ],
)
def test_default_weights_match_unmerged_adapters_logits(
    tmp_path: Path, kind: str, second: list[str]
) -> None:
    """Weights 1: the merged model computes what PEFT computes with both adapters active;
    on a tied model the lm_head adapter unties the head (as for one adapter)."""
    from transformers import AutoModelForCausalLM

    model = tiny_model(kind, torch.float32)
    base_dir = save_model(model, tmp_path / "base")
    peft_adapter(model, tmp_path / "a0", target_modules=["q_proj", "lm_head"], r=4)
    peft_adapter(model, tmp_path / "a1", target_modules=second, r=2, lora_alpha=5)
    adapters = [tmp_path / "a0", tmp_path / "a1"]
    result = merge(base_dir, adapters, tmp_path / "out", device="cpu")
    assert result.untied == (kind == "llama-tied")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    expected = unmerged_logits(base_dir, adapters)
    one = unmerged_logits(base_dir, adapters[:1])
    assert not torch.allclose(expected, one, atol=1e-3), "the second adapter has no effect"
    torch.testing.assert_close(logits(merged), expected, atol=2e-4, rtol=1e-4)
    assert IDS.shape[1] > 1


def test_dora_on_its_own_modules_merges_like_peft_in_sequence(tmp_path: Path) -> None:
    """DoRA mixed with plain LoRA on other modules: PEFT's cat cannot hold a magnitude, so
    the reference is PEFT merging both adapters (merge_and_unload(adapter_names=…))."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", torch.bfloat16)
    base_dir = save_model(model, tmp_path / "base")
    peft_adapter(model, tmp_path / "lora", target_modules=["q_proj", "gate_proj"])
    peft_adapter(model, tmp_path / "dora", target_modules=["v_proj", "up_proj"], use_dora=True)
    adapters = [tmp_path / "lora", tmp_path / "dora"]
    merge(base_dir, adapters, tmp_path / "out", weights=[0.5, 1], device="cpu")
    pm = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16), adapters[0]
    )
    pm.load_adapter(adapters[1], adapter_name="dora")
    pm.base_model.set_adapter(["default", "dora"])
    for m in pm.modules():  # weight 0.5 on the plain LoRA
        if isinstance(m, LoraLayer) and "default" in m.scaling:
            m.scaling["default"] *= 0.5
    theirs = {k: v.detach() for k, v in pm.merge_and_unload().state_dict().items()}
    assert_matches_peft(merged_tensors(tmp_path / "out"), theirs, model.state_dict(), 8)


def test_modules_to_save_and_trainable_tokens_come_from_their_adapter(tmp_path: Path) -> None:
    model = tiny_model("llama", torch.bfloat16)
    base_dir = save_model(model, tmp_path / "base")
    peft_adapter(model, tmp_path / "a0", target_modules=["q_proj"], modules_to_save=["lm_head"])
    peft_adapter(
        model, tmp_path / "a1", target_modules=["q_proj"], trainable_token_indices=[3, 7, 60]
    )
    perturb(tmp_path / "a0", "lm_head")
    perturb(tmp_path / "a1", "trainable_tokens_delta")
    adapters = [tmp_path / "a0", tmp_path / "a1"]
    merge(base_dir, adapters, tmp_path / "out", weights=[1, 1], device="cpu")
    ours = merged_tensors(tmp_path / "out")
    alone = [peft_merged_state(base_dir, a) for a in adapters]
    for name, ref in (("lm_head.weight", alone[0]), ("model.embed_tokens.weight", alone[1])):
        assert torch.equal(ours[name], ref[name]), name
        assert not torch.equal(ours[name], model.state_dict()[name]), name
    cat = peft_cat_state(base_dir, adapters, [1, 1], torch.bfloat16)
    q = "model.layers.1.self_attn.q_proj.weight"
    assert ulp_diff(ours[q], cat[q]) <= 1 and not torch.equal(ours[q], alone[0][q])


def test_disjoint_trainable_tokens_of_two_adapters(tmp_path: Path) -> None:
    model = tiny_model("llama", torch.bfloat16)
    base_dir = save_model(model, tmp_path / "base")
    rows = [[3, 7], [9, 60, 1]]
    for i, idx in enumerate(rows):
        peft_adapter(
            model, tmp_path / f"a{i}", target_modules=["q_proj"], trainable_token_indices=idx
        )
        perturb(tmp_path / f"a{i}", "trainable_tokens_delta", seed=i)
    adapters = [tmp_path / "a0", tmp_path / "a1"]
    merge(base_dir, adapters, tmp_path / "out", device="cpu")
    embed = "model.embed_tokens.weight"
    ours = merged_tensors(tmp_path / "out")[embed]
    expected = model.state_dict()[embed].clone()
    for path, idx in zip(adapters, rows, strict=True):
        alone = peft_merged_state(base_dir, path)[embed]
        assert not torch.equal(alone[idx], expected[idx])
        expected[idx] = alone[idx]
    assert torch.equal(ours, expected)


REFUSALS = {
    "dora-shared": (
        dict(target_modules=["q_proj"]),
        dict(target_modules=["q_proj", "v_proj"], use_dora=True),
        None,
        "DoRA",
    ),
    "dora-weighted": (
        dict(target_modules=["q_proj"]),
        dict(target_modules=["v_proj"], use_dora=True),
        "1,0.5",
        "cannot be weighted",
    ),
    "modules-to-save-both": (
        dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
        dict(target_modules=["v_proj"], modules_to_save=["lm_head"]),
        None,
        "both replace it",
    ),
    "modules-to-save-and-lora": (
        dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
        dict(target_modules=["lm_head"]),
        None,
        "replaces it",
    ),
    "replacement-weighted": (
        dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
        dict(target_modules=["v_proj"]),
        "0.5,1",
        "cannot be weighted",
    ),
    "tokens-overlap": (
        dict(target_modules=["q_proj"], trainable_token_indices=[3, 7]),
        dict(target_modules=["v_proj"], trainable_token_indices=[7, 9]),
        None,
        "both set trainable-token row 7",
    ),
    "tokens-and-embedding-lora": (
        dict(target_modules=["q_proj"], trainable_token_indices=[3, 7]),
        dict(target_modules=["v_proj", "embed_tokens"]),
        None,
        "PEFT cannot combine the two on one embedding",
    ),
    "trained-bias-weighted": (
        dict(target_modules=["q_proj"], bias="lora_only"),  # saves q_proj.base_layer.bias
        dict(target_modules=["v_proj"]),
        "0.5,1",
        "cannot be weighted",
    ),
    "lora-bias": (
        dict(target_modules=["q_proj"]),
        dict(target_modules=["v_proj"], lora_bias=True),
        None,
        "lora_bias",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refuses_what_has_no_single_meaning(tmp_path: Path, run_cli, case: str) -> None:
    first, second, weights, reason = REFUSALS[case]
    kind = "qwen2" if "bias" in case else "llama"
    model = tiny_model(kind, torch.bfloat16)
    base_dir = save_model(model, tmp_path / "base")
    peft_adapter(model, tmp_path / "a0", **first)
    peft_adapter(model, tmp_path / "a1", **second)
    for i, lora in enumerate((first, second)):
        if lora.get("modules_to_save"):  # a trained copy: different values in each adapter
            perturb(tmp_path / f"a{i}", "lm_head", seed=i)
    args = ["merge", base_dir, tmp_path / "a0", tmp_path / "a1", "-o", tmp_path / "out"]
    code, _, err = run_cli(*args, *(["--weights", weights] if weights else []))
    err = err.replace("\n", "")
    assert code == MergeError.exit_code, err
    assert reason in err
    named = [a for a in ("/a0", "/a1") if a in err]
    assert len(named) == (1 if "weighted" in case or "bias" in case else 2), err
    assert not (tmp_path / "out").exists()


def test_weights_must_fit_the_adapters(tmp_path: Path, run_cli, bf16_adapters) -> None:
    _, _, base_dir, adapters = bf16_adapters
    for bad in ("0.5", "0.5,x", "1,nan"):
        code, _, err = run_cli("merge", base_dir, *adapters, "-o", tmp_path / "o", "--weights", bad)
        assert code == 2 and "--weights" in err, (bad, err)
    assert not (tmp_path / "o").exists()
    code, _, err = run_cli("validate", base_dir, "--weights", "1,1")
    assert code == 2 and "--weights applies to --base with --adapter" in err
    code, stdout, _ = run_cli(
        "merge", base_dir, *adapters, "-o", tmp_path / "o", "--weights", "2,1"
    )
    assert code == 0 and "adapters (weighted sum, one pass)" in stdout
    assert "× 2" in stdout and "× 1" in stdout


def test_json_and_validate_recompute_several(tmp_path: Path, run_cli, bf16_adapters) -> None:
    _, _, base_dir, adapters = bf16_adapters
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        "merge", base_dir, *adapters, "-o", out, "--weights", "0.7,-0.3", "--json"
    )
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["adapters"] == [
        {"path": str(adapters[0]), "weight": 0.7},
        {"path": str(adapters[1]), "weight": -0.3},
    ]
    code, stdout, _ = run_cli(
        "merge", base_dir, *adapters, "--dry-run", "--json", "--weights", "0.7,-0.3"
    )
    assert code == 0 and json.loads(stdout)["adapters"] == doc["adapters"]

    def check(*extra: str) -> dict:
        argv = ["validate", out, "--base", base_dir, "--json"]
        argv += [x for a in adapters for x in ("--adapter", a)]
        _, stdout, _ = run_cli(*argv, *extra)
        return json.loads(stdout)

    good = check("--weights", "0.7,-0.3")
    assert good["valid"], good["findings"]
    assert good["weights"] == [0.7, -0.3] and good["adapters"] == [str(a) for a in adapters]
    assert sum(r["kind"] == "merge" for r in good["recomputed"]) == 7
    wrong = check("--weights", "0.7,0.3")
    assert not wrong["valid"] and wrong["exit_code"] == 1
    assert {f["tensor"] for f in wrong["findings"]} >= {"model.layers.0.mlp.down_proj.weight"}
