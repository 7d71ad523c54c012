"""Adapter target names ↔ checkpoint tensor names: the one pairing every command uses.

``merge``, ``validate --base``, ``convert --to`` (through the merge preflight) and
``extract`` pair the names an adapter was trained with (the running model's) with the
names a checkpoint was saved with. Candidates are tried in order and the first that the
caller accepts wins (the caller checks shapes: a rename is only right if every target
fits): the names as they are; transformers' own rules for the model class
(``transformers_rules``), where transformers has any; lora's prefix rules
(``prefix_rules``) where it has none. Which rule mapped which name is kept for the report.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lora_cli.names.prefix_rules import PREFIX_RULES, apply_prefix_rule
from lora_cli.names.transformers_rules import transformers_rules

IDENTITY = "identity"
# Marks a problem that no rename can solve: transformers changes the tensor's shape at load.
CONVERTED = "changes shape at load"
MISSING = "base has no tensor"  # a target name the checkpoint does not hold


@dataclass
class Renamed:
    target: str  # adapter (runtime) name
    checkpoint: str  # the checkpoint's name for it
    rules: list[str]  # the rules that mapped it, in order

    def to_json(self) -> dict[str, Any]:
        return {"adapter": self.target, "checkpoint": self.checkpoint, "rules": self.rules}


@dataclass
class Resolution:
    """How adapter names were paired with checkpoint names."""

    rule: str  # what the summary line shows
    source: str  # identity | transformers | lora
    mapping: dict[str, str]  # adapter target name → checkpoint name
    renamed: list[Renamed] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # empty: every target paired and fits

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "source": self.source,
            "renamed": [r.to_json() for r in self.renamed],
        }


Accept = Callable[[dict[str, str]], list[str]]


def pair_names(
    adapter_targets: Iterable[str],
    checkpoint_names: Collection[str],
    config: dict[str, Any] | None,
    *,
    accept: Accept | None = None,
) -> Resolution:
    """Pair each adapter target with a checkpoint name.

    ``config`` is the checkpoint's config.json (its ``model_type`` and ``architectures``
    choose transformers' rules). ``accept(mapping)`` lists what is wrong with a candidate
    (default: targets missing from ``checkpoint_names``). Returns the first candidate with
    no problems, else the one with the fewest, its ``problems`` filled in.
    """
    targets = list(dict.fromkeys(adapter_targets))
    names = (
        checkpoint_names
        if isinstance(checkpoint_names, (set, frozenset, dict))
        else set(checkpoint_names)
    )

    def missing(mapping: dict[str, str]) -> list[str]:
        return [f"{t}: {MISSING} {n!r}" for t, n in mapping.items() if n not in names]

    check = accept or missing
    best: Resolution | None = None
    for candidate in _candidates(targets, names, config):
        problems = check(candidate.mapping)
        if candidate.problems:  # shape-changing conversions explain those targets better
            problems = candidate.problems + [p for p in problems if MISSING not in p]
        candidate.problems = problems
        if not problems:
            return candidate
        if best is None or _rank(problems) < _rank(best.problems):
            best = candidate
    assert best is not None
    return best


def _rank(problems: list[str]) -> tuple[int, bool]:
    """Fewest problems first; on a tie, the candidate that knows a conversion explains them."""
    return len(problems), not any(CONVERTED in p for p in problems)


def _candidates(
    targets: list[str], names: Collection[str], config: dict[str, Any] | None
) -> Iterator[Resolution]:
    yield Resolution(IDENTITY, IDENTITY, {t: t for t in targets})
    if all(t in names for t in targets):
        return  # nothing to rename: no need to build transformers' model class
    by_transformers = _transformers_candidate(targets, names, config)
    if by_transformers is not None:
        yield by_transformers
    for label, rule in PREFIX_RULES:
        mapping, renamed = {}, []
        for t in targets:
            name, used = apply_prefix_rule(t, rule, names.__contains__)
            mapping[t] = name
            if used:
                renamed.append(Renamed(t, name, [used]))
        yield Resolution(label, "lora", mapping, renamed)


def _transformers_candidate(
    targets: list[str], names: Collection[str], config: dict[str, Any] | None
) -> Resolution | None:
    rules = transformers_rules(config, len(names))
    if rules is None or not rules.renames_anything:
        return None
    by_runtime: dict[str, tuple[str, tuple[str, ...]]] = {}
    converted: dict[str, tuple[str, list[str]]] = {}  # runtime name → (converter, its sources)
    for name in names:
        runtime = rules.to_runtime(name)
        if runtime.converter is None:
            by_runtime.setdefault(runtime.name, (name, runtime.rules))
        else:
            for produced in runtime.converted:
                converted.setdefault(produced, (runtime.converter, []))[1].append(name)
    mapping, renamed, problems = {}, [], []
    for t in targets:
        if t in names:
            mapping[t] = t
            continue
        runtime = rules.to_runtime(t)
        hit = by_runtime.get(runtime.name)
        if hit is not None:
            mapping[t] = hit[0]
            renamed.append(Renamed(t, hit[0], [*runtime.rules, *hit[1]]))
            continue
        mapping[t] = t
        if runtime.name in converted:
            converter, sources = converted[runtime.name]
            problems.append(
                f"{t}: the base holds it only as {len(sources)} tensor(s) such as "
                f"{sorted(sources)[0]!r}, which transformers converts at load ({converter}), "
                f"a conversion that {CONVERTED}: a LoRA on it has no exact place in them"
            )
    return Resolution(rules.label, "transformers", mapping, renamed, problems)
