"""Shared test setup: keep transformers quiet (warnings are filtered in pyproject.toml); keep the sha256 cache
of large inputs (lorafuse.io.provenance) in a folder of this test session, never in the user's ~/.cache."""

import atexit
import os
import shutil
import tempfile

import transformers

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

if "LORAFUSE_HASH_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="lorafuse-test-sha256-")
    os.environ["LORAFUSE_HASH_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, True)
