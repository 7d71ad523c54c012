"""Shared builders for the reliability suite: valid inputs, the bad-input catalogue, and the
crafted pickles, so every test corrupts inputs the same way.

Lives beside conftest.py so any test folder can import it (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import signal
import struct
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from conftest import load_owned, peft_adapter, save_model, tiny_model
from safetensors.torch import save_file

SHARD2 = "model-00002-of-00002.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
TMP_MARK = ".lora-tmp-"


# -- valid inputs ----------------------------------------------------------------------------
def build_inputs(root: Path) -> tuple[Path, Path]:
    """A two-shard tiny llama base (bf16) and a PEFT adapter with non-zero lora_B."""
    model = tiny_model("llama")
    model.config.architectures = ["LlamaForCausalLM"]
    base = save_model(model, root / "base", max_shard_size="20KB")
    assert (base / SHARD2).is_file()
    adapter = root / "adapter"
    peft_adapter(model, adapter, target_modules=["q_proj", "v_proj"])
    (adapter / "README.md").unlink(missing_ok=True)  # PEFT's model card: noise here
    return base, adapter


def copy_inputs(src: tuple[Path, Path], dst: Path) -> tuple[Path, Path]:
    dst.mkdir(parents=True, exist_ok=True)
    base = Path(shutil.copytree(src[0], dst / "base"))
    adapter = Path(shutil.copytree(src[1], dst / "adapter"))
    return base, adapter


def tree_digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (relative path → digest), for 'never modified'."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def temp_siblings(dest: Path) -> list[Path]:
    """Temporaries the writer leaves beside ``dest`` (``.<name>.lora-tmp-<pid>``)."""
    return sorted(dest.parent.glob(f".{dest.name}{TMP_MARK}*"))


# -- safetensors surgery --------------------------------------------------------------------
def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def assemble(header_text: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header_text)) + header_text + data


def write_header(path: Path, header: dict, data: bytes | None = None) -> None:
    _, old_data = split(path)
    text = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(assemble(text, old_data if data is None else data))


def tensor_entries(header: dict) -> list[tuple[str, dict]]:
    """(name, entry) by data offset, without ``__metadata__``."""
    items = [(k, v) for k, v in header.items() if k != "__metadata__"]
    return sorted(items, key=lambda kv: kv[1]["data_offsets"][0])


def _truncated(p: Path) -> str:
    raw = p.read_bytes()
    p.write_bytes(raw[:-10])
    return tensor_entries(split_raw(raw)[0])[-1][0]


def split_raw(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _header_past_eof(p: Path) -> None:
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])


def _header_too_large(p: Path) -> None:
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", 100_000_001) + raw[8:])


def _replace_header_text(p: Path, text: bytes) -> None:
    """Same header length (padded with spaces), new text: only the header changes."""
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert len(text) <= n
    p.write_bytes(raw[:8] + text + b" " * (n - len(text)) + raw[8 + n :])


def _non_utf8(p: Path) -> None:
    _replace_header_text(p, b'{"w\xff\xfe": 1}')


def _non_object(p: Path) -> None:
    _replace_header_text(p, b"[1, 2, 3]")


def _overlap(p: Path) -> str:
    header, _ = split(p)
    entries = tensor_entries(header)
    name = entries[1][0]
    header[name]["data_offsets"] = list(entries[0][1]["data_offsets"])
    header[name]["shape"] = list(entries[0][1]["shape"])
    header[name]["dtype"] = entries[0][1]["dtype"]
    write_header(p, header)
    return name


def _gap(p: Path) -> str:
    header, data = split(p)
    entries = tensor_entries(header)
    name = entries[-1][0]
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start + 8, end + 8]
    write_header(p, header, data[:start] + b"\0" * 8 + data[start:])
    return name


def _unknown_dtype(p: Path) -> str:
    header, _ = split(p)
    name = tensor_entries(header)[0][0]
    header[name]["dtype"] = "F12"
    write_header(p, header)
    return name


def _shape_mismatch(p: Path) -> str:
    header, _ = split(p)
    name = tensor_entries(header)[0][0]
    header[name]["shape"][0] += 1
    write_header(p, header)
    return name


def _duplicate_name(p: Path) -> str:
    header, data = split(p)
    name, entry = tensor_entries(header)[0]
    text = json.dumps(header, separators=(",", ":"))
    dup = json.dumps({name: entry}, separators=(",", ":"))[1:-1]
    text = text[:-1] + "," + dup + "}"
    p.write_bytes(assemble(text.encode(), data))
    return name


# name → (corrupt(path) -> tensor name or None, text the error must contain)
SHARD_CORRUPTIONS: dict[str, tuple[Callable[[Path], str | None], str]] = {
    "truncated": (_truncated, "data bytes"),
    "header-past-eof": (_header_past_eof, "runs past the end of the file"),
    "header-over-100MB": (_header_too_large, "exceeds the 100 MB limit"),
    "header-not-utf8": (_non_utf8, "not valid UTF-8"),
    "header-not-object": (_non_object, "not a JSON object"),
    "offsets-overlap": (_overlap, "overlap or leave a gap"),
    "offsets-gap": (_gap, "overlap or leave a gap"),
    "unknown-dtype": (_unknown_dtype, "unknown dtype 'F12'"),
    "shape-offset-mismatch": (_shape_mismatch, "bytes but data_offsets span"),
    "duplicate-names": (_duplicate_name, "appears twice"),
}


def corrupt(path: Path, case: str) -> str | None:
    """Apply a catalogue corruption to one safetensors file; returns the tensor it names."""
    fn, _ = SHARD_CORRUPTIONS[case]
    return fn(path)


# -- adapter surgery -----------------------------------------------------------------------
def set_adapter_tensor(folder: Path, key_part: str, fn: Callable[[torch.Tensor], None]) -> str:
    path = folder / ADAPTER_FILE
    tensors = load_owned(path)
    key = sorted(k for k in tensors if key_part in k)[0]
    fn(tensors[key])
    save_file(tensors, path, metadata={"format": "pt"})
    return key


def empty_adapter_file(folder: Path) -> None:
    """The 40-byte adapter_model.safetensors a DeepSpeed ZeRO-3 save writes: no tensors."""
    save_file({}, folder / ADAPTER_FILE, metadata={"format": "pt"})
    assert (folder / ADAPTER_FILE).stat().st_size == 40


# -- crafted pickles: hand-assembled opcodes, so the exact global names are ours ------------
def op_global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def op_str(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def op_list(*items: bytes) -> bytes:
    return b"](" + b"".join(items) + b"e"


def op_call(func: bytes, *args: bytes) -> bytes:
    return func + b"(" + b"".join(args) + b"tR"


def malicious_pickles(marker: Path, key: str = "weight") -> dict[str, bytes]:
    """name → data.pkl that creates ``marker`` when unpickled by plain pickle."""
    m = str(marker)
    exec_it = op_call(
        op_call(
            op_global("builtins", "getattr"),
            op_call(op_global("builtins", "__import__"), op_str("builtins")),
            op_str("exec"),
        ),
        op_str(f"open({m!r}, 'w').close()"),
    )
    calls = {
        "os_system": op_call(op_global("os", "system"), op_str(f"touch {m}")),
        "subprocess_popen": op_call(
            op_global("subprocess", "Popen"), op_list(op_str("touch"), op_str(m))
        ),
        "builtins_eval": op_call(
            op_global("builtins", "eval"), op_str(f"open({m!r}, 'w').close()")
        ),
        "builtins_exec_nested": exec_it,
    }
    return {k: b"\x80\x02}" + op_str(key) + v + b"s." for k, v in calls.items()}


def proves_payload_runs(pkl: bytes, marker: Path) -> bool:
    """Control: plain pickle really executes the payload (so 'no marker' means something)."""
    import time

    pickle.loads(pkl)
    deadline = time.monotonic() + 3
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    found = marker.exists()
    marker.unlink(missing_ok=True)
    return found


def torch_file_with_pickle(dst: Path, state: dict[str, torch.Tensor], pkl: bytes) -> Path:
    """A real torch zip of ``state`` whose data.pkl is replaced by ``pkl``."""
    src = dst.with_name(dst.name + ".orig")
    torch.save(state, src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith("/data.pkl"):
                data = pkl
            zout.writestr(name, data)
    src.unlink()
    return dst


def shard_of(folder: Path, tensor: str) -> Path:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return folder / json.loads(index.read_text())["weight_map"][tensor]
    return folder / "model.safetensors"


def edit_tensor(path: Path, tensor: str, fn: Callable[[torch.Tensor], None]) -> None:
    """Change one tensor's bytes in place (the header stays valid): ``fn`` edits a view."""
    from lora_cli.io.dtypes import to_torch

    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    entry = json.loads(raw[8 : 8 + n])[tensor]
    start, end = (8 + n + o for o in entry["data_offsets"])
    view = torch.frombuffer(memoryview(raw)[start:end], dtype=to_torch(entry["dtype"]))
    fn(view.reshape(entry["shape"]))
    path.write_bytes(bytes(raw))


def add_ulps(k: int) -> Callable[[torch.Tensor], None]:
    """Move the first element ``k`` representable values away from zero (k ulp)."""
    int_type = {2: torch.int16, 4: torch.int32}

    def fn(t: torch.Tensor) -> None:
        flat = t.view(-1)
        i = int(torch.nonzero(flat != 0)[0])
        bits = flat.view(int_type[flat.element_size()])
        bits[i] += k

    return fn


# -- in-process fuzzing: a hang becomes a failure ----------------------------------------------
class Hang(Exception):
    pass


@contextmanager
def no_hang(seconds: int) -> Iterator[None]:
    """Raise ``Hang`` in the main thread if the block runs past ``seconds``."""

    def alarm(signum, frame):
        raise Hang(f"reader still busy after {seconds}s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
