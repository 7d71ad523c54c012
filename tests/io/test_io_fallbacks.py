"""The reader and writer suites again, on a platform without the fast paths (``no_fast_io``:
no os.preadv / pread / pwrite / copy_file_range), so the fallbacks are exercised here."""

from __future__ import annotations

import pytest
from test_reader import *  # noqa: F403 - the same tests, collected again under this module
from test_writer import *  # noqa: F403

del test_listing_does_not_read_tensor_data  # noqa: F821 - patches os.preadv itself


@pytest.fixture(autouse=True)
def _fallbacks_only(no_fast_io):
    yield
