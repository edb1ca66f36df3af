"""What the name of an adapter output means: the rules live with the formats (formats.outputs, which the model's
Adapter.save also reaches through the format registry); the operations import them from here."""

from __future__ import annotations

from lorafuse.formats.outputs import (
    ADAPTER_SUFFIX,
    FOLDER_FORMATS,
    ONE_FILE_FORMATS,
    AdapterOutput,
    adapter_output,
    checked_output,
    checkpoint_modules,
    extract_output,
    file_name,
    python_output,
    refusal,
    save_as,
    write_plan,
)

__all__ = ["ADAPTER_SUFFIX", "FOLDER_FORMATS", "ONE_FILE_FORMATS", "AdapterOutput", "adapter_output",
           "checked_output", "checkpoint_modules", "extract_output", "file_name", "python_output", "refusal", "save_as",
           "write_plan"]
