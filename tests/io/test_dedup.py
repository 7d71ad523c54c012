"""Aliased pickle tensors: identical views are stored once, partial views are copied."""

from __future__ import annotations

import pytest
import torch

from lora_cli.io.dedup import deduplicate
from lora_cli.io.reader import open_source


def _infos(tmp_path, state: dict[str, torch.Tensor]):
    torch.save(state, tmp_path / "w.bin")
    src = open_source(tmp_path / "w.bin")
    infos = list(src.infos.values())
    src.close()
    return infos


def test_independent_tensors_are_all_kept(tmp_path):
    d = deduplicate(_infos(tmp_path, {"a": torch.ones(2), "b": torch.ones(2)}), None)
    assert d.keep == ["a", "b"] and d.aliases == {} and d.notes == []


def test_seed_case_modules_to_save_bias_shares_the_base_bias(tmp_path):
    bias = torch.randn(3)
    state = {"classifier.weight": torch.randn(3, 4), "classifier.bias": bias}
    state["classifier.modules_to_save.bias"] = bias
    d = deduplicate(_infos(tmp_path, state), None)
    assert d.keep == ["classifier.weight", "classifier.bias"]
    assert d.aliases == {"classifier.modules_to_save.bias": "classifier.bias"}
    assert len(d.notes) == 1 and "stored once" in d.notes[0]


def test_three_names_over_one_tensor_keep_the_smallest_name(tmp_path):
    t = torch.randn(4)
    d = deduplicate(_infos(tmp_path, {"c": t, "a": t, "b": t}), None)
    assert d.keep == ["a"] and d.aliases == {"b": "a", "c": "a"}


@pytest.mark.parametrize("tie, dropped", [(True, True), (False, False), (None, False)])
def test_tied_lm_head(tmp_path, tie, dropped):
    emb = torch.randn(8, 4)
    state = {"model.embed_tokens.weight": emb, "lm_head.weight": emb, "x": torch.ones(1)}
    d = deduplicate(_infos(tmp_path, state), tie)
    if dropped:
        assert d.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
        assert "lm_head.weight" not in d.keep
        assert d.notes == ["lm_head.weight is tied to model.embed_tokens.weight: stored once"]
    else:
        assert d.aliases == {} and "lm_head.weight" in d.keep
        assert "separate copies" in d.notes[0] and "config.json" in d.notes[0]


def test_partial_and_overlapping_views_are_kept_as_copies(tmp_path):
    base = torch.arange(12.0)
    state = {
        "full": base,
        "lo": base[:6],
        "hi": base[6:],
        "mid": base[3:9],
        "t": base.view(3, 4).t(),
    }
    d = deduplicate(_infos(tmp_path, state), None)
    assert sorted(d.keep) == sorted(state) and d.aliases == {}
    assert len(d.notes) == 1 and "separate contiguous copies" in d.notes[0]


def test_same_bytes_different_shape_is_not_an_alias(tmp_path):
    base = torch.arange(12.0)
    d = deduplicate(_infos(tmp_path, {"flat": base, "mat": base.view(3, 4)}), None)
    assert sorted(d.keep) == ["flat", "mat"] and d.aliases == {}


def test_identical_views_inside_a_larger_storage(tmp_path):
    base = torch.arange(12.0)
    view = base[2:5]
    state = {"base": base, "v1": view, "v2": view}
    d = deduplicate(_infos(tmp_path, state), None)
    assert d.aliases == {"v2": "v1"}
    assert sorted(d.keep) == ["base", "v1"]


def test_empty_tensors_never_alias(tmp_path):
    base = torch.arange(4.0)
    d = deduplicate(_infos(tmp_path, {"a": base[:0], "b": base[:0], "c": base}), None)
    assert sorted(d.keep) == ["a", "b", "c"]
