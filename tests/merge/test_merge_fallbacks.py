"""Merges against PEFT again, on a platform without the fast paths (``no_fast_io``: no
os.preadv / pread / pwrite / copy_file_range): the fallbacks give the same bytes."""

from __future__ import annotations

import pytest
from test_merge_vs_peft import *  # noqa: F403 - the same tests, collected again here


@pytest.fixture(autouse=True)
def _fallbacks_only(no_fast_io):
    yield
