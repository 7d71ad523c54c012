"""The DCP tiling proof on its own: real layouts (row shards, TP×FSDP grids, empty chunks)
pass; an overlap, a gap or a chunk outside the shape is refused; the work is bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_cli.errors import FormatError
from lora_cli.sources import dcp_records
from lora_cli.sources.dcp_records import Chunk, MetadataRecords


def _records() -> MetadataRecords:
    records = object.__new__(MetadataRecords)
    records.path = Path("ckpt/.metadata")
    return records


def _chunks(*boxes: tuple[tuple[int, ...], tuple[int, ...]]) -> list[Chunk]:
    return [Chunk(o, s, "__0_0.distcp", 0, 0) for o, s in boxes]


@pytest.mark.parametrize(
    "shape, boxes",
    [
        ((128, 32), [((0, 0), (43, 32)), ((43, 0), (43, 32)), ((86, 0), (42, 32))]),
        ((4, 6), [((r, c), (2, 3)) for r in (0, 2) for c in (0, 3)]),  # 2x2 grid, any order
        ((4, 6), [((2, 3), (2, 3)), ((0, 0), (2, 3)), ((2, 0), (2, 3)), ((0, 3), (2, 3))]),
        ((5,), [((0,), (5,)), ((5,), (0,))]),  # an empty chunk on the last rank
        ((), [((), ())]),  # a scalar
        ((0, 4), []),
    ],
    ids=["rows", "grid", "grid-shuffled", "empty-chunk", "scalar", "empty"],
)
def test_real_layouts_tile(shape, boxes):
    _records()._check_tiling("w", shape, _chunks(*boxes))


@pytest.mark.parametrize(
    "shape, boxes, message",
    [
        ((128, 32), [((0, 0), (43, 32)), ((42, 0), (43, 32)), ((86, 0), (42, 32))], "overlap"),
        ((4, 6), [((0, 0), (2, 3)), ((0, 0), (2, 3)), ((2, 0), (2, 6))], "overlap"),
        ((4, 6), [((0, 0), (4, 3))], "cover 12 elements"),
    ],
    ids=["rows-overlap-and-gap", "duplicate", "gap"],
)
def test_bad_layouts_are_refused(shape, boxes, message):
    with pytest.raises(FormatError, match=message):
        _records()._check_tiling("w", shape, _chunks(*boxes))


def test_overlap_checks_are_bounded(monkeypatch):
    """Many chunks stacked on the same rows (each a column): refused past the budget."""
    monkeypatch.setattr(dcp_records, "MAX_TILING_CHECKS", 100)
    boxes = [((0, c), (4, 1)) for c in range(40)]
    with pytest.raises(FormatError, match="chunk pairs"):
        _records()._check_tiling("w", (4, 40), _chunks(*boxes))
    monkeypatch.setattr(dcp_records, "MAX_TILING_CHECKS", 10_000)
    _records()._check_tiling("w", (4, 40), _chunks(*boxes))
