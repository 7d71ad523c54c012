"""A real Hugging Face Hub cache, built here the way huggingface_hub lays it out
(``models--org--name/{blobs,snapshots,refs}``), so Hub ids resolve offline in tests."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
COMMIT_V2 = "fedcba9876543210fedcba9876543210fedcba98"


def add_to_cache(cache: Path, repo_id: str, folder: Path, commit: str, ref: str = "main") -> Path:
    """Store ``folder`` as huggingface_hub does: content-addressed blobs, a snapshot of
    relative symlinks, and ``refs/<ref>`` holding the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(Path("../../blobs") / digest)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


def go_offline(monkeypatch, cache: Path) -> None:
    """huggingface_hub answers from ``cache`` only (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
