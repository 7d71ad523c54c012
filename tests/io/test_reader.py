"""One lazy reader for safetensors files, shard folders, indexes and torch zip pickles."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_cli.errors import FormatError
from lora_cli.io import reader as reader_mod
from lora_cli.io.dtypes import SAFETENSORS_DTYPES, from_torch
from lora_cli.io.reader import open_source


def _tensors(seed: int = 0, prefix: str = "") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"{prefix}a.weight": torch.randn(4, 3, generator=g),
        f"{prefix}a.bias": torch.randn(3, generator=g).to(torch.bfloat16),
        f"{prefix}ids": torch.arange(5),
    }


def _check(source, tensors: dict[str, torch.Tensor]) -> None:
    assert set(source.names()) == set(tensors)
    for name, t in tensors.items():
        info = source.info(name)
        assert info.dtype == from_torch(t.dtype)
        assert info.shape == tuple(t.shape)
        assert info.nbytes == t.numel() * t.element_size()
        got = source.read(name)
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got, t), name
    assert source.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())


def _index(folder: Path, name: str, weight_map: dict[str, str]) -> Path:
    path = folder / name
    path.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return path


def _sharded(folder: Path, suffix: str, index_name: str | None) -> dict[str, torch.Tensor]:
    """Two shards (and an index when ``index_name``) holding three tensors."""
    folder.mkdir(exist_ok=True)
    t1, t2 = _tensors(1, "x."), _tensors(2, "y.")
    stem = "model" if suffix == ".safetensors" else "pytorch_model"
    names = [f"{stem}-0000{i}-of-00002{suffix}" for i in (1, 2)]
    for part, name in zip((t1, t2), names, strict=True):
        if suffix == ".safetensors":
            save_file(part, folder / name, metadata={"format": "pt"})
        else:
            torch.save(part, folder / name)
    if index_name:
        _index(
            folder,
            index_name,
            {k: n for part, n in zip((t1, t2), names, strict=True) for k in part},
        )
    return {**t1, **t2}


# --- sources --------------------------------------------------------------------------------


def test_single_safetensors_file(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt", "k": "v"})
    with open_source(tmp_path / "model.safetensors") as src:
        assert src.format == "safetensors"
        assert src.files == [tmp_path / "model.safetensors"]
        assert src.index_path is None
        assert src.file_metadata[tmp_path / "model.safetensors"] == {"format": "pt", "k": "v"}
        assert all(i.raw_offset is not None for i in src.infos.values())
        _check(src, tensors)


def test_folder_with_a_safetensors_index(tmp_path):
    tensors = _sharded(tmp_path / "m", ".safetensors", "model.safetensors.index.json")
    with open_source(tmp_path / "m") as src:
        assert src.index_path == tmp_path / "m" / "model.safetensors.index.json"
        assert len(src.files) == 2
        assert src.index_map["y.ids"] == "model-00002-of-00002.safetensors"
        assert src.info("y.ids").file.name == "model-00002-of-00002.safetensors"
        _check(src, tensors)


def test_index_file_given_directly_and_other_index_names(tmp_path):
    folder = tmp_path / "m"
    tensors = _sharded(folder, ".safetensors", "diffusion_pytorch_model.safetensors.index.json")
    with open_source(folder) as src:  # any *.safetensors.index.json
        assert src.index_path.name == "diffusion_pytorch_model.safetensors.index.json"
        _check(src, tensors)
    with open_source(folder / "diffusion_pytorch_model.safetensors.index.json") as src:
        _check(src, tensors)


def test_model_index_is_preferred_among_several(tmp_path):
    folder = tmp_path / "m"
    tensors = _sharded(folder, ".safetensors", "model.safetensors.index.json")
    _index(folder, "other.safetensors.index.json", {"x.ids": "model-00001-of-00002.safetensors"})
    with open_source(folder) as src:
        assert src.index_path.name == "model.safetensors.index.json"
        _check(src, tensors)


def test_several_indexes_without_a_model_index_are_ambiguous(tmp_path):
    folder = tmp_path / "m"
    _sharded(folder, ".safetensors", "a.safetensors.index.json")
    _index(folder, "b.safetensors.index.json", {"x.ids": "model-00001-of-00002.safetensors"})
    with pytest.raises(FormatError, match="several safetensors indexes"):
        open_source(folder)


def test_folder_of_shards_without_an_index(tmp_path):
    tensors = _sharded(tmp_path / "m", ".safetensors", None)
    with open_source(tmp_path / "m") as src:
        assert src.index_path is None and len(src.files) == 2
        _check(src, tensors)


def test_adapter_model_safetensors(tmp_path):
    tensors = {"base_model.model.l.lora_A.weight": torch.randn(2, 4)}
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with open_source(tmp_path) as src:
        _check(src, tensors)


def test_sharded_bin_with_pytorch_index(tmp_path):
    folder = tmp_path / "m"
    tensors = _sharded(folder, ".bin", "pytorch_model.bin.index.json")
    (folder / "training_args.bin").write_bytes(b"not a state dict")
    with open_source(folder) as src:
        assert src.format == "torch"
        assert src.index_path.name == "pytorch_model.bin.index.json"
        _check(src, tensors)


def test_sharded_bin_without_index_ignores_trainer_files(tmp_path):
    folder = tmp_path / "m"
    tensors = _sharded(folder, ".bin", None)
    (folder / "training_args.bin").write_bytes(b"junk")
    (folder / "optimizer.pt").write_bytes(b"junk")
    with open_source(folder) as src:
        assert sorted(f.name for f in src.files) == [
            "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin",
        ]
        _check(src, tensors)


def test_safetensors_win_over_bin_in_one_folder(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    torch.save({"other": torch.ones(1)}, tmp_path / "pytorch_model.bin")
    with open_source(tmp_path) as src:
        assert src.format == "safetensors"
        _check(src, tensors)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_torch_file(tmp_path, suffix):
    tensors = _tensors()
    path = tmp_path / f"weights{suffix}"
    torch.save(tensors, path)
    with open_source(path) as src:
        assert src.format == "torch"
        _check(src, tensors)


def test_torch_file_views_are_listed_with_their_storage(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    tensors = {"full": base, "half": base[6:], "t": base.view(3, 4).t(), "own": torch.ones(2)}
    torch.save(tensors, tmp_path / "w.pt")
    with open_source(tmp_path / "w.pt") as src:
        infos = src.infos
        assert infos["full"].storage == infos["half"].storage == infos["t"].storage
        assert infos["own"].storage != infos["full"].storage
        assert infos["half"].byte_span == (24, 48)
        assert infos["full"].complete and not infos["half"].complete
        assert infos["t"].raw_offset is None  # transposed: must be decoded
        assert infos["half"].raw_offset is not None  # contiguous slice: copied raw
        _check(src, {k: v.contiguous() for k, v in tensors.items()})


# --- inconsistent checkpoints ------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_index_naming_a_missing_shard(tmp_path, suffix):
    folder = tmp_path / "m"
    index = (
        "model.safetensors.index.json"
        if suffix == ".safetensors"
        else "pytorch_model.bin.index.json"
    )
    _sharded(folder, suffix, index)
    stem = "model" if suffix == ".safetensors" else "pytorch_model"
    missing = folder / f"{stem}-00002-of-00002{suffix}"
    missing.unlink()
    with pytest.raises(FormatError, match=f"{missing.name}.*missing") as info:
        open_source(folder)
    assert index in str(info.value)


def test_index_pointing_outside_the_folder_is_refused(tmp_path):
    folder = tmp_path / "m"
    _sharded(folder, ".safetensors", None)
    save_file({"evil": torch.ones(1)}, tmp_path / "outside.safetensors")
    _index(folder, "model.safetensors.index.json", {"evil": "../outside.safetensors"})
    with pytest.raises(FormatError, match="missing"):
        open_source(folder)


def test_index_and_shards_disagree(tmp_path):
    folder = tmp_path / "m"
    tensors = _sharded(folder, ".safetensors", None)
    weight_map = {k: "model-00001-of-00002.safetensors" for k in tensors}  # y.* are in shard 2
    _index(folder, "model.safetensors.index.json", weight_map)
    with pytest.raises(FormatError, match=r"'y\.[a-z.]+' is listed in model-00001.*does not hold"):
        open_source(folder)


def test_index_listing_a_tensor_no_shard_holds(tmp_path):
    folder = tmp_path / "m"
    tensors = _sharded(folder, ".safetensors", None)
    weight_map = {k: "model-00001-of-00002.safetensors" for k in _tensors(1, "x.")}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in _tensors(2, "y.")}
    weight_map["ghost.weight"] = "model-00001-of-00002.safetensors"
    _index(folder, "model.safetensors.index.json", weight_map)
    assert len(weight_map) == len(tensors) + 1
    with pytest.raises(FormatError, match="ghost.weight"):
        open_source(folder)


@pytest.mark.parametrize(
    "doc", [{}, {"weight_map": []}, {"weight_map": {"a": 1}}, [1], "x"], ids=str
)
def test_malformed_index(tmp_path, doc):
    folder = tmp_path / "m"
    _sharded(folder, ".safetensors", None)
    (folder / "model.safetensors.index.json").write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="not a valid index|must be a JSON object"):
        open_source(folder)


def test_index_that_is_not_json(tmp_path):
    folder = tmp_path / "m"
    _sharded(folder, ".safetensors", None)
    (folder / "model.safetensors.index.json").write_text("{")
    with pytest.raises(FormatError, match="index is not valid JSON"):
        open_source(folder)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_duplicate_tensor_across_shards(tmp_path, suffix):
    folder = tmp_path / "m"
    folder.mkdir()
    names = [f"model-0000{i}-of-00002{suffix}" for i in (1, 2)]
    for i, name in enumerate(names):
        part = {"shared": torch.ones(2) * i, f"own{i}": torch.ones(1)}
        if suffix == ".safetensors":
            save_file(part, folder / name)
        else:
            torch.save(part, folder / name)
    with pytest.raises(FormatError, match=f"'shared' also appears in {names[0]}") as info:
        open_source(folder)
    assert names[1] in str(info.value)


def test_nothing_to_read(tmp_path):
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(FormatError, match="no weights found"):
        open_source(tmp_path)
    with pytest.raises(FormatError, match="no such file"):
        open_source(tmp_path / "missing")


def test_truncated_data_is_a_format_error_when_read(tmp_path):
    """A header valid for a longer file: refused at open, before any data is touched."""
    save_file({"a": torch.ones(100)}, tmp_path / "m.safetensors")
    blob = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(blob[:-4])
    with pytest.raises(FormatError, match="m.safetensors"):
        open_source(tmp_path / "m.safetensors")


def test_file_shrinking_after_open_is_a_format_error(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(100)}, path)
    with open_source(path) as src:
        os.truncate(path, path.stat().st_size - 40)
        with pytest.raises(FormatError, match="ends early"):
            src.read("a")


# --- laziness ------------------------------------------------------------------------------


def test_listing_a_huge_sparse_file_reads_no_data(tmp_path):
    """Header says 8 GiB of data; the file is sparse. Listing is instant and reads nothing."""
    n = 2**31
    header = json.dumps({"big": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}})
    header += " " * (-(8 + len(header)) % 8)
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header.encode())
        f.truncate(8 + len(header) + 4 * n)
    with open_source(path) as src:
        info = src.info("big")
        assert info.shape == (n,) and info.nbytes == 4 * n and info.dtype == "F32"
        assert src.total_bytes == 4 * n


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_listing_does_not_read_tensor_data(tmp_path, monkeypatch, kind):
    tensors = _tensors()
    if kind == "safetensors":
        path = tmp_path / "m.safetensors"
        save_file(tensors, path)
    else:
        path = tmp_path / "m.bin"
        torch.save(tensors, path)

    def forbidden(*a, **k):
        raise AssertionError("tensor data was read while listing")

    from lora_cli.io import torch_zip

    monkeypatch.setattr(reader_mod, "read_exact", forbidden)
    monkeypatch.setattr(torch_zip.TorchZipFile, "read", forbidden)
    monkeypatch.setattr(torch_zip.TorchZipFile, "_pread", forbidden)  # storages' bytes
    with open_source(path) as src:
        for name, t in tensors.items():
            assert src.info(name).shape == tuple(t.shape)
        with pytest.raises(AssertionError, match="was read"):
            src.read("ids")


# --- dtypes ------------------------------------------------------------------------------

_WHOLE_BYTE = [
    name
    for name, (bits, attr) in SAFETENSORS_DTYPES.items()
    if bits % 8 == 0 and attr and hasattr(torch, attr)
]


def _sample(dtype: torch.dtype) -> torch.Tensor:
    """48 seeded random bytes viewed as ``dtype`` (NaN payloads included: compared bitwise)."""
    g = torch.Generator().manual_seed(7)
    if dtype == torch.bool:
        return torch.randint(0, 2, (4, 12), generator=g).bool()
    raw = torch.randint(0, 256, (48,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(2, -1)


@pytest.mark.parametrize("dtype", _WHOLE_BYTE)
@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_read_is_bit_exact_for_every_dtype(tmp_path, dtype, kind):
    t = _sample(getattr(torch, SAFETENSORS_DTYPES[dtype][1]))
    tensors = {"t": t, "scalar": t.reshape(-1)[:1].reshape(()), "empty": t[:0]}
    if kind == "safetensors":
        from lora_cli.io.writer import ShardWriter

        path = tmp_path / "m.safetensors"
        w = ShardWriter(path, [(k, dtype, tuple(v.shape)) for k, v in tensors.items()])
        for k, v in tensors.items():
            w.write(k, v)
        w.close()
    else:
        path = tmp_path / "m.pt"
        torch.save(tensors, path)
    with open_source(path) as src:
        for name, expected in tensors.items():
            got = src.read(name)
            assert src.info(name).dtype == dtype
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert _raw_bytes(got) == _raw_bytes(expected)


def _raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
