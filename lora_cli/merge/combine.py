"""Several adapters × one checkpoint → one merge plan, so each base tensor is read once.

``lora merge BASE A1 A2 … --weights w1,w2,…`` merges ``W + Σ wᵢ·sᵢ·Bᵢ@Aᵢ``, rounded
once: what PEFT's ``add_weighted_adapter(..., combination_type="cat")`` followed by
``merge_and_unload()`` gives with its combined adapter kept in fp32 and scale 1 (see
``math.merge_weighted``). Each adapter is first planned alone (``plan.build_plan``: name
resolution, shapes, tied embeddings, every preflight error); this module then joins the
per-adapter actions tensor by tensor and refuses what has no single meaning:

* two adapters replacing one tensor with different values (``modules_to_save``, resized
  embeddings), or one replacing what another adapts;
* a DoRA module shared with another adapter, or a DoRA adapter with a weight other than
  1 (the magnitude renormalises the whole weight; PEFT's ``cat`` drops it);
* a weight other than 1 on ``modules_to_save`` replacements or trainable-token rows
  (they are values, not deltas), overlapping trainable tokens, rows and another adapter's
  LoRA on one embedding, ``lora_bias`` and ``target_parameters`` (PEFT's
  ``add_weighted_adapter`` does not combine them).

The copy of the base PEFT saves beside an embedding LoRA (``…base_layer.weight``) is the
value the weighted deltas start from; adapters that both adapt one embedding must carry
identical copies. Only adapter tensors are compared at plan time: the base is read once,
in the streaming pass.

The joined plan reads adapter tensors through ``CombinedSource``, which names adapter
``i``'s key ``k`` as ``"i/k"``, so ``run.compute_tensor`` needs no knowledge of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from lora_cli.adapters.peft import Adapter, LoraModule
from lora_cli.errors import MergeError, UsageError
from lora_cli.io.layout import OUTPUT_EMBEDDING
from lora_cli.io.reader import TensorInfo, TensorSource
from lora_cli.merge.plan import MergePlan, TensorAction, build_plan, layout_shards
from lora_cli.names import Resolution

if TYPE_CHECKING:
    import torch

FIX = "merge that adapter alone first, then merge the others into its output"


class CombinedSource:
    """Several adapters' tensors under one name space: adapter ``i``'s key ``k`` is ``"i/k"``.

    ``"i/k + j/l"`` reads both stacked along dim 0: the trainable-token rows of several
    adapters on one embedding, replaced in one go.
    """

    STACK = " + "

    def __init__(self, sources: Sequence[TensorSource]) -> None:
        self.sources = list(sources)

    @staticmethod
    def key(index: int, key: str) -> str:
        return f"{index}/{key}"

    def _split(self, key: str) -> tuple[TensorSource, str]:
        index, _, name = key.partition("/")
        return self.sources[int(index)], name

    def info(self, key: str) -> TensorInfo:
        src, name = self._split(key)
        return src.info(name)

    def read(self, key: str, **kwargs: Any) -> torch.Tensor:
        if self.STACK in key:
            import torch

            return torch.cat([self.read(k, **kwargs) for k in key.split(self.STACK)])
        src, name = self._split(key)
        return src.read(name, **kwargs)

    def close(self) -> None:
        """The adapters own their sources; whoever opened them closes them."""


def build_combined_plan(
    base: TensorSource,
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    *,
    out_dtype: str | None = None,
    max_shard_size: int | None = None,
) -> MergePlan:
    """One plan that merges every adapter's weighted delta in a single pass over ``base``."""
    if len(adapters) != len(weights):
        raise UsageError(f"{len(weights)} weights for {len(adapters)} adapters")
    plans = [build_plan(base, ad, out_dtype=out_dtype) for ad in adapters]
    names = [str(ad.root) for ad in adapters]
    for i, plan in enumerate(plans):
        for act in plan.actions():
            if act.experts:
                raise MergeError(
                    f"{names[i]}: target_parameters (MoE expert) adapters cannot be combined "
                    "with others (PEFT's add_weighted_adapter refuses them too)",
                    FIX,
                )
            if act.bias is not None:
                raise MergeError(
                    f"{names[i]}: lora_bias adapters cannot be combined with others: "
                    "PEFT's add_weighted_adapter drops lora_B.bias (peft#3761)",
                    FIX,
                )

    per_tensor: dict[str, list[tuple[int, TensorAction]]] = {}
    for i, plan in enumerate(plans):
        for act in plan.actions():
            if act.kind != "copy" or act.base != act.name:  # untied lm_head: a copy of embed
                per_tensor.setdefault(act.name, []).append((i, act))

    actions: dict[str, TensorAction] = {}
    for name, touches in per_tensor.items():
        actions[name] = _join(name, touches, adapters, weights, names)

    untied = any(p.untied for p in plans)
    embed = None
    if untied and OUTPUT_EMBEDDING in actions:
        embed = actions[OUTPUT_EMBEDDING].base
    config_updates: dict[str, Any] = {}
    for p in plans:
        config_updates.update(p.config_updates)
    rules = {p.rule for p in plans}
    rule = (
        plans[0].rule
        if len(rules) == 1
        else "; ".join(f"{n}: {p.rule}" for n, p in zip(names, plans, strict=True))
    )
    warnings = [f"{n}: {w}" for n, p in zip(names, plans, strict=True) for w in p.warnings]
    combined = replace(
        adapters[0],
        source=CombinedSource([ad.source for ad in adapters]),
        modules={},
        replacements={},
        token_rows={},
        producer="several adapters",
        warnings=warnings,
    )
    return MergePlan(
        base=base,
        adapter=combined,
        shards=layout_shards(base, actions, embed, out_dtype, max_shard_size),
        rule=rule,
        config=plans[0].config,
        config_updates=config_updates,
        untied=untied,
        warnings=warnings,
        combined=list(zip(adapters, weights, strict=True)),
        resolution=_joined_resolution(rule, plans),
    )


def _joined_resolution(rule: str, plans: list[MergePlan]) -> Resolution:
    """One report of the renames every adapter's own pairing made (the same name once)."""
    renamed = {}
    for p in plans:
        for r in p.resolution.renamed if p.resolution else []:
            renamed.setdefault((r.target, r.checkpoint), r)
    return Resolution(rule, "several", {}, list(renamed.values()))


def _join(
    name: str,
    touches: list[tuple[int, TensorAction]],
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    names: list[str],
) -> TensorAction:
    """One action for ``name`` from every adapter's action on it; refuses conflicts."""
    first = touches[0][1]
    out = TensorAction(name, first.dtype, first.shape, base=first.base)
    touches = [(i, a) for i, a in touches if a.kind != "copy"]  # an untied head's plain copy
    rows = [(i, a) for i, a in touches if a.rows]
    loras = [(i, op) for i, a in touches for op in a.loras]
    row_owners = {i for i, _ in rows}
    if rows and any(j not in row_owners for j, _ in loras):
        j = next(j for j, _ in loras if j not in row_owners)
        raise MergeError(
            f"{name}: {names[rows[0][0]]} sets trainable-token rows of it while {names[j]} "
            "adapts it with LoRA; PEFT cannot combine the two on one embedding",
            FIX,
        )

    replaced = [(i, a) for i, a in touches if a.replacement]
    if replaced:
        i, act = replaced[0]
        assert act.replacement is not None
        for j, other in touches:
            if j == i:
                continue
            if not other.replacement:
                raise MergeError(
                    f"{name}: {names[i]} replaces it (modules_to_save or a resized embedding) "
                    f"while {names[j]} adapts it; the two cannot be combined",
                    FIX,
                )
            if not _same_tensor(adapters[i], act.replacement, adapters[j], other.replacement):
                raise _conflict(name, (names[i], act.replacement), (names[j], other.replacement))
        out.replacement = CombinedSource.key(i, act.replacement)
        out.shape = act.shape
        for j, other in replaced:
            # the copy of the base PEFT saves beside an embedding LoRA is where its weighted
            # delta starts from; a modules_to_save module is a value that cannot be weighted
            if not _is_base_copy(str(other.replacement)):
                _needs_unit_weight(weights, j, names, name, "its full replacement")

    seen: dict[int, int] = {}
    for i, act in rows:
        assert act.rows is not None
        _needs_unit_weight(weights, i, names, name, "its trainable-token rows")
        for index in act.rows[1]:
            if index in seen:
                raise MergeError(
                    f"{name}: {names[seen[index]]} and {names[i]} both set trainable-token "
                    f"row {index}; PEFT refuses overlapping trainable tokens too",
                    FIX,
                )
            seen[index] = i
    if rows:  # disjoint row sets: one stacked replacement, in adapter order
        keys = [CombinedSource.key(i, a.rows[0]) for i, a in rows if a.rows]
        out.rows = (CombinedSource.STACK.join(keys), list(seen))

    dora = [(i, op) for i, op in loras if op.module.has_dora]
    if dora:
        i, op = dora[0]
        others = [j for j, _ in loras if j != i]
        if others:
            raise MergeError(
                f"{name}: {names[i]} (DoRA) and {names[others[0]]} both adapt it; DoRA "
                "renormalises the whole weight, so their sum has no meaning (PEFT's "
                "add_weighted_adapter drops the magnitude, peft#3761)",
                FIX,
            )
        _needs_unit_weight(weights, i, names, name, "DoRA")
    for i, op in loras:
        module = _rekey(op.module, i)
        weight = None if op.module.has_dora else weights[i]
        if weight is not None and (op.rounding != "once" or op.block):
            raise MergeError(
                f"{name}: {names[i]} is a {adapters[i].variant.name} adapter whose "
                "merge rounds differently; it cannot join a weighted sum",
                FIX,
            )
        out.loras.append(replace(op, module=module, weight=weight))
    return out


def _is_base_copy(key: str) -> bool:
    """The embedding copy PEFT saves beside an embedding LoRA (not a trained ``bias="all"``
    bias, which PEFT also saves under ``base_layer``)."""
    return key.endswith(".base_layer.weight")


def _conflict(tensor: str, a: tuple[str, str], b: tuple[str, str]) -> MergeError:
    """Two adapters that start ``tensor`` from different values: say which kind each is."""
    copies = [_is_base_copy(key) for _, key in (a, b)]
    if all(copies):
        return MergeError(
            f"{tensor}: {a[0]} and {b[0]} adapt it from different copies of it (a resized or "
            "retrained embedding); the two cannot be combined",
            FIX,
        )
    if any(copies):
        owner, adapter = (b[0], a[0]) if copies[0] else (a[0], b[0])
        return MergeError(
            f"{tensor}: {owner} replaces it (modules_to_save) while {adapter} adapts it; "
            "the two cannot be combined",
            FIX,
        )
    return MergeError(
        f"{tensor}: {a[0]} and {b[0]} both replace it (modules_to_save) with different "
        "values; PEFT cannot combine them either",
        "keep one of them: merge it alone, then merge the other's LoRA into it",
    )


def _needs_unit_weight(
    weights: Sequence[float], i: int, names: list[str], tensor: str, what: str
) -> None:
    if weights[i] != 1.0:
        raise MergeError(
            f"{tensor}: {names[i]} has weight {weights[i]:g}, but {what} cannot be weighted "
            "(PEFT's add_weighted_adapter cannot combine it)",
            "give that adapter weight 1, or " + FIX,
        )


def _rekey(module: LoraModule, index: int) -> LoraModule:
    parts = {part: CombinedSource.key(index, key) for part, key in module.parts.items()}
    return replace(module, parts=parts)


def _same_tensor(a: Adapter, key_a: str, b: Adapter, key_b: str) -> bool:
    import torch

    ta, tb = a.source.read(key_a), b.source.read(key_b)
    return ta.dtype == tb.dtype and ta.shape == tb.shape and torch.equal(ta, tb)
