"""File I/O: safetensors reading and writing, checkpoints, atomic outputs."""
