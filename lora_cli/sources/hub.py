"""Inputs named by Hugging Face Hub id: ``org/name`` or ``org/name@revision``.

Every command argument that names a model or an adapter (``inspect PATH``, ``validate PATH
--base --adapter``, ``convert INPUT --base``, ``merge BASE ADAPTER``) goes through
``resolve_input``. One that is not an existing path but is a valid repo id resolves to a
folder of the local Hugging Face cache, through huggingface_hub itself: its cache layout, its
auth (``HF_TOKEN`` or ``hf auth login``), its progress bars and its offline switch
(``HF_HUB_OFFLINE=1`` answers from the cache only). Online, only what a merge reads is
downloaded: top-level weights (safetensors when the repo has them, never ``*.bin`` beside
them), their index, config, tokenizer, generation and licence files, never training state
(optimizer, scheduler, RNG) nor subfolders such as Llama's ``original/``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from lora_cli.errors import HubError, UsageError

Notice = Callable[[str], None]

_TRAINING_STATE = re.compile(
    r"^(optimizer|scheduler|scaler|training_args|trainer_state|rng_state.*)\.(pt|pth|bin|json)$"
)
_SIDE_FILE = re.compile(
    r"(\.json|\.model|\.tiktoken|\.jinja|\.py)$|^(merges|vocab)\.txt$|^(LICEN[CS]E|NOTICE|USE_POLICY)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


def parse_repo_ref(text: str) -> HubRef | None:
    """``org/name[@revision]`` as a HubRef; None when ``text`` cannot be a model repo id."""
    repo_id, at, revision = text.partition("@")
    if at and not revision:
        return None
    if repo_id.count("/") != 1:  # the Hub's model ids are always namespaced: org/name
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return HubRef(repo_id, revision or None)


def select_files(names: Iterable[str]) -> list[str]:
    """The files of a repo listing that a merge reads (see the module docstring)."""
    top = [n for n in names if "/" not in n and not _TRAINING_STATE.match(n)]
    if any(n.endswith(".safetensors") for n in top):
        weights = [n for n in top if n.endswith((".safetensors", ".safetensors.index.json"))]
    else:
        weights = [n for n in top if n.endswith((".bin", ".bin.index.json", ".pt", ".pth"))]
    side = [n for n in top if _SIDE_FILE.search(n) and not n.endswith(".index.json")]
    return sorted(set(weights) | set(side))


def resolve_input(
    ref: str | Path, what: str, *, notice: Notice | None = None, progress: bool = True
) -> Path:
    """``ref`` itself when it exists on disk; else the cached snapshot of the Hub repo it
    names (downloading what is missing unless offline). ``what`` names the argument in
    messages (``base``, ``adapter``)."""
    path = Path(ref)
    if path.exists():
        return path
    hub = parse_repo_ref(str(ref))
    if hub is None:
        return path  # not a repo id: the reader reports the missing path as usual
    folder = _snapshot(hub, what, progress)
    if notice:
        notice(f"{what} {hub}: Hugging Face Hub snapshot {folder}")
    return folder


def names_hub_repo(ref: str | Path) -> bool:
    """Whether ``resolve_input`` would take ``ref`` to the Hub (no local path by that name)."""
    return not Path(ref).exists() and parse_repo_ref(str(ref)) is not None


def base_from_adapter_config(config: dict, config_path: Path, notice: Notice | None) -> str:
    """The base an adapter was trained on (``base_model_name_or_path``), for ``lora merge
    ADAPTER -o OUT``; says which one it took."""
    name = config.get("base_model_name_or_path")
    if not isinstance(name, str) or not name.strip():
        raise UsageError(
            f"{config_path}: no base_model_name_or_path to take the base from",
            "name the base: lora merge BASE ADAPTER -o OUTPUT",
        )
    if not Path(name).exists() and parse_repo_ref(name) is None:
        raise UsageError(
            f"{config_path}: base_model_name_or_path {name!r} is neither a folder here nor a "
            "Hugging Face Hub id",
            "name the base: lora merge BASE ADAPTER -o OUTPUT",
        )
    if notice:
        notice(f"base {name}: taken from {config_path.name} (base_model_name_or_path)")
    return name


def _snapshot(hub: HubRef, what: str, progress: bool) -> Path:
    from huggingface_hub import constants, snapshot_download

    with hub_progress_bars(progress):
        try:
            if constants.HF_HUB_OFFLINE:
                return Path(snapshot_download(hub.repo_id, revision=hub.revision))
            patterns = [_literal(n) for n in select_files(_listing(hub))]
            return Path(
                snapshot_download(hub.repo_id, revision=hub.revision, allow_patterns=patterns)
            )
        except HubError:
            raise
        except Exception as exc:  # huggingface_hub's and the network's errors, mapped below
            raise hub_error(hub, what, exc) from None


def _listing(hub: HubRef) -> list[str]:
    """The repo's files; offline-like failures (no network) fall back to the cache alone."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        _reach_hub()
        return HfApi().list_repo_files(hub.repo_id, revision=hub.revision)
    except Exception as exc:
        if hub_error_kind(exc) in ("missing", "gated", "revision"):
            raise
        try:  # the Hub is unreachable: a cached snapshot still serves
            folder = Path(
                snapshot_download(hub.repo_id, revision=hub.revision, local_files_only=True)
            )
        except Exception:
            raise exc from None
        return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]


def _reach_hub() -> None:
    """One request, no retries: huggingface_hub (2.4) retries a refused or unresolvable
    connection 5 times with backoff (1+2+4+8+8 s, two log lines a try) before it fails;
    a Hub that does not answer at all is known at once and the cache is asked instead."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)


def hub_error_kind(exc: BaseException) -> str:
    """``gated``, ``revision``, ``missing``, ``offline`` or ``other``, told by class name:
    huggingface_hub moved its errors between modules across the versions we support."""
    names = {c.__name__ for c in type(exc).__mro__}
    if "GatedRepoError" in names:
        return "gated"
    if "RevisionNotFoundError" in names:
        return "revision"
    if "RepositoryNotFoundError" in names:
        return "missing"
    if names & {"LocalEntryNotFoundError", "OfflineModeIsEnabled"}:
        return "offline"
    return "other"


def hub_error(hub: HubRef, what: str, exc: BaseException) -> HubError:
    """One line for a failed Hub look-up (gated, missing, no such revision, offline,
    unreachable); the snapshot path and the shard-by-shard path word them alike."""
    kind = hub_error_kind(exc)
    where = f"{what} {hub}: not a local path"
    if kind == "gated":
        return HubError(
            f"{where}, and the Hub repo is gated",
            f"accept its terms on https://huggingface.co/{hub.repo_id} and set HF_TOKEN",
        )
    if kind == "missing":
        return HubError(
            f"{where}, and no such repo on the Hugging Face Hub (or it is private)",
            "check the path or the id; a private repo needs HF_TOKEN",
        )
    if kind == "revision":
        return HubError(f"{where}, and the Hub repo has no revision {hub.revision!r}")
    if kind == "offline":
        return HubError(
            f"{where}, and the Hugging Face cache holds no snapshot of it (offline)",
            "download it once online (HF_HUB_OFFLINE unset), or pass a local folder",
        )
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return HubError(
        f"{where}, and the Hugging Face Hub could not be reached ({first})",
        "check the network, or set HF_HUB_OFFLINE=1 to use the local cache",
    )


def _literal(name: str) -> str:
    """A file name as an fnmatch pattern matching only itself."""
    return re.sub(r"([*?\[])", r"[\1]", name)


class hub_progress_bars:
    """The Hub's own progress bars, switched off for ``--quiet`` and ``--json``."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.was_disabled = False

    def __enter__(self) -> None:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

        self.was_disabled = are_progress_bars_disabled()
        if not self.enabled:
            disable_progress_bars()

    def __exit__(self, *exc: object) -> None:
        from huggingface_hub.utils import enable_progress_bars

        if not self.enabled and not self.was_disabled:
            enable_progress_bars()
