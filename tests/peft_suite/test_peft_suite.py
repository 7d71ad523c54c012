"""Every LoRA configuration of PEFT's own test suite through ``lora merge``, against PEFT.

For each configuration (tests/peft_suite/peft_cases.py) and base dtype: build the model,
wrap it with ``get_peft_model``, randomize every trainable tensor (lora_B included, so a
merge that does nothing fails), save the adapter, run our merge stage in-process, and
compare with PEFT 0.21.2's ``PeftModel.from_pretrained(...).merge_and_unload()``:

* a merge must be within 1 ulp of PEFT's tensor everywhere (and the counts below show
  how many cases are bit-identical);
* a refusal must name its true reason (the variant, grouped convolutions, ...);
* where PEFT itself cannot merge (a crash, or a refusal), our result is checked against
  the unmerged PeftModel's outputs instead, or must be a refusal too.

PEFT's merge is also run at torch's ambient thread count: a case whose PEFT result changes
with the thread count is recorded as thread-dependent; ours is compared with PEFT pinned at
the thread count lora's merge math runs at on a CPU (``tests/peft_oracle.py``, which pins
every PEFT merge in the suite). The counts are printed
after the module; ``LORA_PEFT_SUITE_REPORT=path.json`` also writes every case's outcome there.
"""

from __future__ import annotations

import copy
import json
import os
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import save_model, tiny_model, ulp_diff
from peft_cases import INPUTS, MODELS, Case, cases
from peft_oracle import unpinned_peft_merges
from safetensors.torch import load_file, save_file

from lora_cli.errors import LoraError
from lora_cli.stages.merge import merge

pytestmark = pytest.mark.filterwarnings("ignore")

DECODERS = {"llama": {"num_hidden_layers": 1}, "gpt2": {"n_layer": 1}}
RESULTS: dict[str, dict] = {}  # case id → outcome, for the summary line

PARAMS = [
    pytest.param(case, dtype, id=f"{case.name}-{str(dtype).removeprefix('torch.')}")
    for case in cases()
    for dtype in case.dtypes
]


@pytest.fixture(scope="module", autouse=True)
def summary(request: pytest.FixtureRequest):
    """After the module: the counts (cases, bit-identical, within 1 ulp, refused, time)."""
    start = time.perf_counter()
    yield
    if not RESULTS:
        return
    counts: dict[str, int] = {}
    for outcome in RESULTS.values():
        counts[outcome["result"]] = counts.get(outcome["result"], 0) + 1
    threaded = [k for k, o in RESULTS.items() if o["thread_dependent"]]
    parts = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    line = (
        f"PEFT suite: {len(RESULTS)} cases passed ({parts}); PEFT's own result depends on "
        f"the thread count in {len(threaded)} ({', '.join(threaded) or '-'}); "
        f"{time.perf_counter() - start:.1f} s at {torch.get_num_threads()} threads"
    )
    report = os.environ.get("LORA_PEFT_SUITE_REPORT")  # per-case outcomes, for the record
    if report:
        Path(report).write_text(json.dumps(RESULTS, indent=1, sort_keys=True) + "\n")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("\n" + line)


def _build(case: Case, dtype: torch.dtype) -> torch.nn.Module:
    if case.model in DECODERS:
        return tiny_model(case.model, dtype, **{**DECODERS[case.model], **case.model_args})
    torch.manual_seed(0)
    return MODELS[case.model]().to(dtype).eval()


def _randomize(peft_model: torch.nn.Module) -> None:
    """Every trainable tensor gets a non-trivial value, as after training."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if not p.requires_grad:
                continue
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand_like(p))
            else:
                p.add_(0.3 * torch.randn_like(p))


def _save_base(model: torch.nn.Module, folder: Path, case: Case) -> Path:
    if case.model in DECODERS:
        return save_model(model, folder)
    folder.mkdir()
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, folder / "model.safetensors")
    return folder


def _peft_merge(model: torch.nn.Module, adapter: Path) -> dict[str, torch.Tensor] | Exception:
    from peft import PeftModel

    try:
        merged = PeftModel.from_pretrained(copy.deepcopy(model), adapter).merge_and_unload()
    except Exception as e:  # noqa: BLE001 - PEFT's refusals are what we record
        return e
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _forward_check(case: Case, model, peft_model, ours: dict[str, torch.Tensor]) -> None:
    merged = copy.deepcopy(model).float()
    merged.load_state_dict({k: v.float() for k, v in ours.items()})
    torch.manual_seed(2)
    x = INPUTS[case.model]()
    with torch.no_grad():
        expected = peft_model.float()(x)
        got = merged(x)
        before = model.float()(x)
    expected, got, before = (t[0] if isinstance(t, tuple) else t for t in (expected, got, before))
    assert not torch.allclose(expected, before, atol=1e-4), "the adapter has no effect"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("case", "dtype"), PARAMS)
def test_peft_configuration(tmp_path: Path, case: Case, dtype: torch.dtype) -> None:
    from peft import LoraConfig, get_peft_model

    start = time.perf_counter()
    key = f"{case.name}-{dtype}"
    model = _build(case, dtype)
    base_dir = _save_base(model, tmp_path / "base", case)
    lora = {"init_lora_weights": False, "r": 8, "lora_alpha": 6, **case.lora}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**lora))
        if case.convert_init:  # PEFT's documented PiSSA/OLoRA flow: keep the initial adapter
            peft_model.peft_config["default"].init_lora_weights = True
            peft_model.save_pretrained(tmp_path / "initial")
            peft_model.peft_config["default"].init_lora_weights = lora["init_lora_weights"]
        _randomize(peft_model)
        peft_model.eval().save_pretrained(
            tmp_path / "adapter",
            path_initial_model_for_weight_conversion=(
                tmp_path / "initial" if case.convert_init else None
            ),
        )

        refusal = None
        try:
            merge(base_dir, tmp_path / "adapter", tmp_path / "out", device="cpu")
        except LoraError as e:
            refusal = str(e)
        with unpinned_peft_merges():  # the diagnostic: PEFT at torch's ambient thread count
            theirs = _peft_merge(model, tmp_path / "adapter")
        theirs_1 = _peft_merge(model, tmp_path / "adapter")  # pinned (tests/peft_oracle.py)

    peft_failed = isinstance(theirs, Exception)
    assert peft_failed == case.peft_refuses, f"PEFT's merge: {theirs!r}"[:300]
    outcome: dict = {"thread_dependent": not peft_failed and not _same(theirs, theirs_1)}
    if case.refuse:
        assert refusal is not None, "lora merged what it must refuse"
        assert case.refuse.lower() in refusal.lower(), refusal
        assert "do not fit the base" not in refusal, refusal
        outcome["result"] = "refused"
    else:
        assert refusal is None, refusal
        ours = {}
        for f in sorted((tmp_path / "out").glob("*.safetensors")):
            ours.update(load_file(f))
        base = {k: v for k, v in model.state_dict().items()}
        changed = [k for k in ours if not torch.equal(ours[k], base[k])]
        assert changed, "the merge changed nothing: the case would prove nothing"
        if case.forward_oracle and dtype == torch.float32:
            _forward_check(case, model, peft_model, ours)
        if peft_failed:
            outcome["result"] = "forward-checked"
        else:
            worst = 0
            for name, t in ours.items():
                ref = theirs_1[name]  # PEFT at the thread count of lora's merge math
                assert t.dtype == ref.dtype and t.shape == ref.shape, name
                worst = max(worst, ulp_diff(t, ref))
            assert worst <= 1, f"{worst} ulp from PEFT"
            outcome["result"] = "bit-identical" if worst == 0 else "within 1 ulp"
    outcome["seconds"] = time.perf_counter() - start
    RESULTS[key] = outcome
