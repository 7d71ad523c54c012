"""Paths inside a Hugging Face cache, recognised from the path alone.

huggingface_hub alone manages its cache (snapshots are links to shared, content-addressed
blobs), so a destination there is refused (``destination.py``) and an input there names the
repo it came from (``sources/hub.py`` resolves Hub ids into it).
"""

from __future__ import annotations

from pathlib import Path


def cached_repo_id(path: Path) -> str | None:
    """``org/name`` when ``path`` lies in a Hugging Face cache snapshot
    (``models--org--name/snapshots/<commit>/...``), else None."""
    parts = Path(path).absolute().parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            org_name = parts[i][len("models--") :].split("--")
            if len(org_name) == 2:
                return "/".join(org_name)
    return None


def in_hub_cache(path: Path) -> bool:
    """Whether ``path`` lies in a Hugging Face cache: under ``HF_HUB_CACHE``, or in any
    ``models--org--name/snapshots/`` folder (a cache elsewhere, e.g. another ``HF_HOME``)."""
    from huggingface_hub import constants

    path = Path(path).absolute()
    cache = Path(constants.HF_HUB_CACHE).absolute()
    caches = {cache, cache.resolve()}
    for candidate in {path, path.resolve()}:
        if cached_repo_id(candidate) or caches & {candidate, *candidate.parents}:
            return True
    return False
