"""Training-checkpoint layouts that are out of scope or broken: one line, exit 2, nothing
written; and validate recomputes a merged checkpoint from BASE + CKPT."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _tag(folder: Path) -> Path:
    return folder / "global_step2"


BREAKAGES = {
    "missing rank": (lambda f: next(_tag(f).glob("zero_pp_rank_1_*optim*")).unlink(),
                     "checkpoint has 1 of 2 optimizer rank files (missing rank 1)"),
    "pipeline": (lambda f: (_tag(f) / "layer_01-model_states.pt").touch(), "pipeline-parallel"),
    "moe": (lambda f: (_tag(f) / "expp_rank_0_mp_rank_00_optim_states.pt").touch(), "MoE"),
    "nvme": (lambda f: (_tag(f) / "offloaded_tensors").mkdir(), "NVMe"),
    "universal": (lambda f: (_tag(f) / "zero").mkdir(), "universal checkpoint"),
    "tensor parallel": (lambda f: (_tag(f) / "mp_rank_01_model_states.pt").touch(),
                        "tensor-parallel"),
    "latest": (lambda f: (f / "latest").write_text("global_step9"), "names tag 'global_step9'"),
}  # fmt: skip


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_deepspeed_refusals_are_one_line(deepspeed_2ranks, tmp_path, run_cli, breakage):
    folder = _copy(deepspeed_2ranks / "zero3", tmp_path / "ckpt")
    mutate, expected = BREAKAGES[breakage]
    mutate(folder)
    for command in (["merge", folder, "-o", tmp_path / "out"], ["inspect", folder]):
        code, _, err = run_cli(*command)
        assert code == 2, (command, err)
        assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_mismatched_world_sizes(deepspeed_2ranks, deepspeed_3ranks, tmp_path, run_cli):
    folder = _copy(deepspeed_2ranks / "zero2", tmp_path / "ckpt")
    shutil.copy(_tag(deepspeed_3ranks / "zero1") / "mp_rank_00_model_states.pt", _tag(folder))
    code, _, err = run_cli("merge", folder, "-o", tmp_path / "out")
    assert code == 2 and "3 data-parallel ranks" in err and "2 ways" in err


def test_per_rank_fsdp_files_are_refused(tmp_path, run_cli):
    folder = tmp_path / "ckpt"
    (folder / "per_rank").mkdir(parents=True)
    (folder / "per_rank" / "pytorch_model_fsdp_0_rank0.bin").write_bytes(b"PK\x03\x04")
    code, _, err = run_cli("merge", folder, "-o", tmp_path / "out")
    assert code == 2 and "per-rank FSDP files" in err


def test_missing_distcp_file(fsdp_3ranks, tmp_path, run_cli):
    folder = _copy(fsdp_3ranks / "ckpt", tmp_path / "ckpt")
    (folder / "pytorch_model_fsdp_0" / "__2_0.distcp").unlink()
    code, _, err = run_cli("merge", folder, "-o", tmp_path / "out")
    assert code == 2 and "__2_0.distcp" in err and "is missing" in err


def test_validate_recomputes_from_base_and_checkpoint(deepspeed_2ranks, tmp_path, run_cli):
    root = deepspeed_2ranks
    out = tmp_path / "merged"
    assert run_cli("merge", root / "zero3", "-o", out, "--base", root / "base", "-q")[0] == 0
    code, stdout, err = run_cli("validate", out, "--base", root / "base",
                                "--adapter", root / "zero3")  # fmt: skip
    assert code == 0, stdout + err
    # another run's checkpoint does not reproduce it
    code, stdout, _ = run_cli("validate", out, "--base", root / "base", "--adapter", root / "zero2")
    assert code == 1 and "recompute" in stdout
