"""Where each output shard goes once it is written: ``--evict`` and ``--push-to-hub``.

A merge writes one output shard after another (``write_shards``); ``ShardSink`` hears of
each once it is complete and fsynced. With ``--push-to-hub`` it pre-uploads the shard's
content to the destination repo (huggingface_hub's ``preupload_lfs_files``: the bytes are
stored, nothing is committed); with ``--evict`` it then deletes the local copy, and deletes
every base shard this job fetched from the Hub once no later output shard reads from it.
At the end one ``create_commit`` publishes the shards, index, config and side files, the
model card and the checksum manifest together: the repo never shows a half-written model,
and a job that fails before that leaves no commit (pre-uploaded content that no commit
names is the Hub's to collect). ``merge --part I/N --push-to-hub`` pre-uploads the part's
shards and records them in its ``part.json``; ``merge --join --push-to-hub`` makes the one
commit from those records without fetching the shards again (``join_to_hub``).
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_cli import __version__
from lora_cli.errors import HubError
from lora_cli.io.writer import OutputDir
from lora_cli.merge.parts import (
    Part,
    PartError,
    collect_parts,
    fingerprint,
    part_shards,
    parts_folder,
    verify_digests,
)
from lora_cli.merge.plan import MergePlan, ShardOut
from lora_cli.merge.run import MergeResult, finish_output, merge_result
from lora_cli.sources.hub import hub_progress_bars, parse_repo_ref
from lora_cli.sources.hub_remote import remote_error, with_retries

PUSH_RECORD = "lora-push.json"


@dataclass
class Push:
    """A destination repo and the shards pre-uploaded to it, committed once by ``commit``."""

    repo_id: str
    revision: str | None = None
    private: bool = False
    create_pr: bool = False
    uploaded: dict[str, dict[str, Any]] = field(default_factory=dict)  # name → sha256, bytes
    _ops: dict[str, Any] = field(default_factory=dict)
    commit_url: str | None = None
    pr_url: str | None = None

    def __post_init__(self) -> None:
        ref = parse_repo_ref(self.repo_id)
        if ref is None or ref.revision:
            raise HubError(
                f"--push-to-hub {self.repo_id!r}: not a Hub repo id",
                "name it org/name; the branch goes in --revision",
            )

    def _call(self, fn: Any, name: str = "") -> Any:
        """With retries; the Hub's upload bars stay off (uploads run beside lora's own bar)."""
        ref = parse_repo_ref(self.repo_id)
        assert ref is not None
        with hub_progress_bars(False):
            return with_retries(fn, lambda exc: remote_error(ref, "--push-to-hub", exc, name))

    def prepare(self) -> None:
        """The repo (and branch) exist before any byte is uploaded."""
        from huggingface_hub import HfApi

        api = HfApi()
        self._call(lambda: api.create_repo(self.repo_id, private=self.private, exist_ok=True))
        if self.revision and not self.create_pr:
            self._call(lambda: api.create_branch(self.repo_id, branch=self.revision, exist_ok=True))

    def preupload(self, name: str, path: Path, digest: str = "") -> bool:
        """Upload ``path``'s content as ``name``, not committed; False when the Hub keeps
        such a file inline (it is then sent with the commit, so it must stay on disk)."""
        from huggingface_hub import CommitOperationAdd, HfApi

        op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
        if digest:
            op.upload_info.sha256 = bytes.fromhex(digest)  # known: no second read
        self._call(
            lambda: HfApi().preupload_lfs_files(
                self.repo_id, additions=[op], revision=self.revision, create_pr=self.create_pr
            ),
            name,
        )
        self._ops[name] = op
        if not op._is_uploaded:
            return False
        self.uploaded[name] = {"sha256": op.upload_info.sha256.hex(), "bytes": op.upload_info.size}
        return True

    def adopt(self, name: str, sha256: str, size: int) -> None:
        """A shard another job pre-uploaded (a part record says so): committed by hash."""
        from huggingface_hub import CommitOperationAdd
        from huggingface_hub.lfs import UploadInfo

        op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=b"")
        op.upload_info = UploadInfo(size=size, sample=b"", sha256=bytes.fromhex(sha256))
        op._upload_mode = "lfs"
        op._is_uploaded = True
        self._ops[name] = op
        self.uploaded[name] = {"sha256": sha256, "bytes": size}

    def commit(self, folder: Path, files: list[str], message: str) -> None:
        """One commit: the pre-uploaded shards and every other file from ``folder``."""
        from huggingface_hub import CommitOperationAdd, HfApi

        ops = [
            self._ops[n] if n in self.uploaded else CommitOperationAdd(n, str(folder / n))
            for n in files
        ]
        info = self._call(
            lambda: HfApi().create_commit(
                self.repo_id, ops, commit_message=message, revision=self.revision,
                create_pr=self.create_pr,
            )
        )  # fmt: skip
        self.commit_url = info.commit_url
        self.pr_url = info.pr_url

    def to_json(self) -> dict[str, Any]:
        return {
            "repo": self.repo_id,
            "revision": self.revision,
            "create_pr": self.create_pr,
            "shards": dict(sorted(self.uploaded.items())),
            "bytes": sum(int(v["bytes"]) for v in self.uploaded.values()),
            "commit_url": self.commit_url,
            "pr_url": self.pr_url,
        }


class ShardSink:
    """Told of each finished output shard (``write_shards``'s ``on_shard``): pre-upload it,
    then with ``evict`` delete it locally and the base shards nothing later reads."""

    def __init__(
        self, plan: MergePlan, shards: list[ShardOut], *, evict: bool, push: Push | None
    ) -> None:
        self.plan = plan
        self.evict = evict
        self.push = push
        self.sizes: dict[str, int] = {}
        self.digests: dict[str, str] = {}
        self._lock = threading.Lock()
        self._readers: dict[Path, set[str]] = {}  # base file → output shards still to write
        for shard in shards:
            for act in shard.actions:
                for name in (act.base, act.rows[0] if act.rows else None):
                    if name and name in plan.base:
                        info = plan.base.info(name)
                        self._readers.setdefault(info.file, set()).add(shard.filename)

    def __call__(self, name: str, path: Path, digest: str) -> None:
        self.sizes[name] = path.stat().st_size
        self.digests[name] = digest
        if self.push is not None:
            inline = not self.push.preupload(name, path, digest)
            if self.evict and not inline:
                path.unlink()
        if self.evict:
            with self._lock:
                for base_file, waiting in self._readers.items():
                    waiting.discard(name)
                    if not waiting:
                        self.plan.base.evict(base_file)

    def record(self) -> dict[str, Any] | None:
        """What goes into a part record: the destination and the shards pre-uploaded."""
        if self.push is None:
            return None
        return {"repo": self.push.repo_id, "revision": self.push.revision,
                "shards": dict(self.push.uploaded)}  # fmt: skip


def commit_message(base: str, adapters: list[str]) -> str:
    return f"lora {__version__}: merge {', '.join(adapters)} into {base}"


def join_to_hub(
    plan: MergePlan,
    output: Path,
    options: dict[str, Any],
    push: Push,
    message: str,
    *,
    overwrite: bool = False,
    model_card: str | None = None,
) -> MergeResult:
    """``--join --push-to-hub``: the parts' shards (pre-uploaded by the parts, or uploaded
    now from the parts folder) and the small files, committed at once. OUT receives the
    small files (index, config, card, manifest)."""
    start = time.perf_counter()
    folder = parts_folder(output)
    split, records = collect_parts(folder, fingerprint(plan, options))
    push.prepare()
    digests: dict[str, str] = {}
    for index, record in sorted(records.items()):
        part = Part(index, split.count)
        want = [s.filename for s in part_shards(plan, part)]
        pushed = record.pushed
        same_repo = pushed is not None and (pushed.repo, pushed.revision) == (
            push.repo_id,
            push.revision,
        )
        if sorted(record.shards) != sorted(want):
            raise PartError(
                f"{folder / part.dirname}: part {part.label} holds {sorted(record.shards)}, "
                f"planned {want}",
                f"rerun it: lora merge … --part {part.label}",
            )
        for name in want:
            have = record.shards[name]
            entry = pushed.shards.get(name) if same_repo and pushed is not None else None
            local = folder / part.dirname / name
            if entry is not None and entry != have:
                raise PartError(
                    f"{folder / part.dirname}: part {part.label} records {name} as pushed with "
                    "another size or sha256 than it wrote",
                    f"rerun it: lora merge … --part {part.label} --push-to-hub {push.repo_id}",
                )
            if entry is not None:
                push.adopt(name, entry.sha256, entry.nbytes)
            elif local.is_file() and local.stat().st_size == have.nbytes:
                # the bytes must be the ones the part hashed: preupload trusts the digest
                verify_digests(
                    {name: local}, {name: local}, {name: have.sha256}, {name: part.label}
                )
                push.preupload(name, local, have.sha256)
            else:
                raise PartError(
                    f"{local}: shard of part {part.label} is neither here nor pushed to "
                    f"{push.repo_id}",
                    f"rerun it: lora merge … --part {part.label} --push-to-hub {push.repo_id}",
                )
            digests[name] = have.sha256
    digests = {s.filename: digests[s.filename] for s in plan.shards}
    with OutputDir(output, overwrite) as out:
        files = finish_output(plan, out.path, digests, options.get("checksums", True), model_card)
        push.commit(out.path, [*digests, *(f for f in files if f not in digests)], message)
    shutil.rmtree(folder, ignore_errors=True)
    written = sum(int(v["bytes"]) for v in push.uploaded.values())
    result = merge_result(plan, output, files, "-", time.perf_counter() - start, written)
    result.part = f"joined {split.count}"
    result.pushed = push.to_json()
    return result
