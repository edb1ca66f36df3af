"""Shared test setup: keep transformers quiet (warnings are filtered in pyproject.toml)."""

import transformers

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
