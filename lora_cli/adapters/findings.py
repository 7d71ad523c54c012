"""What is wrong with an adapter that still loads: the one list ``merge`` and ``validate``
(and ``inspect``) act on, so the three never disagree about an adapter.

Each finding says whether it refuses the adapter. A refusing finding is a ``validate``
finding (exit 1) and a ``merge`` refusal (exit 2): the merged model would not be what PEFT
loads (a regex ``target_modules`` that leaves modules out), or would be the base itself
(every ``lora_B`` zero: an untrained or empty save). The others are warnings in both (a
``validate`` note): some ``lora_B`` are zero, which a run that froze some modules also gives.

``config_findings`` reads only the config and names (no torch: it runs while a merge plans);
``value_findings`` reads the ``lora_B`` tensors (it runs with the deferred NaN/Inf scan).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_cli.errors import MergeError

if TYPE_CHECKING:
    from lora_cli.adapters.peft import Adapter


@dataclass(frozen=True)
class AdapterFinding:
    file: Path
    message: str
    hint: str | None
    refuses: bool


def config_findings(adapter: Adapter) -> list[AdapterFinding]:
    """A string (regex) ``target_modules`` that PEFT's ``re.fullmatch`` would not match
    with some of the adapter's modules: PEFT loads no weights for those."""
    from lora_cli.adapters.peft import regex_matches

    targets = adapter.config.get("target_modules")
    if not isinstance(targets, str) or targets.lower() == "all-linear" or not adapter.modules:
        return []
    matched, unmatched = regex_matches(adapter, targets)
    n = len(adapter.modules)
    hint = "fix target_modules, or rewrite it as the module list: lora convert --targets-as-list"
    if not matched:
        message = (
            f"regex target_modules {targets!r} matches none of the {n} adapter modules"
            " (or is not a valid regex): PEFT would load no LoRA weights"
        )
    elif unmatched:
        message = (
            f"regex target_modules {targets!r} does not match {len(unmatched)} of the "
            f"{n} adapter modules (e.g. {unmatched[0]}): PEFT would ignore their weights"
        )
    else:
        return []
    return [AdapterFinding(adapter.config_path, message, hint, refuses=True)]


def value_findings(adapter: Adapter) -> list[AdapterFinding]:
    """All-zero ``lora_B`` (PEFT's initial value): an untrained module merges to the base."""
    keys = [
        m.parts.get("lora_B.weight") or m.parts.get("lora_embedding_B")
        for m in adapter.modules.values()
    ]
    keys = [k for k in keys if k and adapter.source.info(k).numel]
    zero = sum(1 for k in keys if not bool(adapter.source.read(k).float().abs().sum()))
    if not zero:
        return []
    if zero == len(keys):
        message = "every lora_B is all zeros: the adapter is untrained and merges to the base"
        hint = "use a checkpoint saved after training (a ZeRO-3 save needs gathered weights)"
        return [AdapterFinding(adapter.weights_file, message, hint, refuses=True)]
    message = f"{zero} of {len(keys)} lora_B tensors are all zeros (untrained modules)"
    return [AdapterFinding(adapter.weights_file, message, None, refuses=False)]


def refuse_or_warn(findings: list[AdapterFinding]) -> list[str]:
    """``merge``'s reading: raise the first refusing finding, return the others' warnings."""
    for f in findings:
        if f.refuses:
            raise MergeError(f"{f.file}: {f.message}", f.hint, file=f.file)
    return [f"{f.file.name}: {f.message}" for f in findings]


def refuse_repeated(adapters: list[Path]) -> None:
    """The same adapter given twice would add its delta twice: almost always a repeated
    argument (``$ADAPTER $ADAPTER``), so it is refused; ``--weights 2`` says it on purpose.
    Same means the same file or folder, or a copy whose weight files hold the same bytes
    (hashed only when names and sizes already agree)."""
    from lora_cli.errors import UsageError

    paths = [Path(p) for p in adapters]
    if len(paths) < 2:
        return
    sizes = [_weight_files(p) for p in paths]
    for j, path in enumerate(paths):
        for i in range(j):
            same_path = paths[i].resolve() == path.resolve()
            same_bytes = bool(sizes[i]) and sizes[i] == sizes[j]
            if same_path or (same_bytes and _digest(paths[i]) == _digest(path)):
                how = "given twice" if same_path else f"the same weights as {paths[i]}"
                raise UsageError(
                    f"adapter {path}: {how}; its delta would be added twice",
                    "give each adapter once (to scale one, use --weights, e.g. --weights 2)",
                )


def _weight_files(path: Path) -> list[tuple[str, int]]:
    """(name, size) of an adapter's weight files: the file itself, or a folder's."""
    if path.is_file():
        return [(path.name, path.stat().st_size)]
    if not path.is_dir():
        return []
    return sorted(
        (p.name, p.stat().st_size)
        for p in path.iterdir()
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".gguf", ".pt")
    )


def _digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, _ in _weight_files(path):
        with open(path if path.is_file() else path / name, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()
