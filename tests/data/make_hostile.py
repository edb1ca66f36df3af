#!/usr/bin/env python3
"""(Re)generate the hostile-input corpus under tests/data/hostile/ and its manifest.

Every file is a few KB at most and built byte by byte here (no randomness, no other
writer), so the output is identical on every run: tests/test_hostile.py regenerates it
and compares, so the corpus and this script cannot drift apart.

    python3 tests/data/make_hostile.py [--out DIR]

manifest.json lists one case per file or folder:
    path     relative to the corpus folder
    loader   "safetensors" (open with SafetensorsFile and read every tensor),
             "checkpoint" (lorafuse.io.checkpoint.Checkpoint), "load" (lorafuse.load,
             an adapter folder or file) or "apply" (the CLI's apply of `path` into `base`)
    error    the exact lorafuse.errors class name expected, or null when the input is valid
    match    a regex the message must match (re.search); the message must also name the
             path (for every loader but "apply", which names the module instead)
    why      what is wrong with it
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "hostile"
MANIFEST = "manifest.json"
PREFIX = "base_model.model."
MODULE = "model.layers.0.self_attn.q_proj"

CASES: list[dict[str, object]] = []
FILES: dict[str, bytes] = {}


# ----------------------------------------------------------------------------- builders


def entry(dtype: str, shape: list[object], begin: object, end: object) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def st_bytes(header: dict[str, object] | bytes, data: bytes = b"", length: int | None = None,
             pad: bool = True) -> bytes:
    """A safetensors file: 8-byte length, header (a dict is JSON-encoded, padded to 8), data."""
    if isinstance(header, dict):
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if pad:
            raw += b" " * ((8 - len(raw) % 8) % 8)
    else:
        raw = header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def tensors_file(tensors: dict[str, tuple[str, np.ndarray]], metadata: dict[str, str] | None = None) -> bytes:
    """A valid safetensors file from {name: (dtype, array)} in the given order."""
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    data, cursor = b"", 0
    for name, (dtype, arr) in tensors.items():
        blob = np.ascontiguousarray(arr).tobytes()
        header[name] = entry(dtype, list(arr.shape), cursor, cursor + len(blob))
        data += blob
        cursor += len(blob)
    return st_bytes(header, data)


def f32(*shape: int, start: float = 0.0) -> np.ndarray:
    n = int(np.prod(shape)) if shape else 1
    return ((np.arange(n, dtype=np.float32) + start) / 8).reshape(shape).astype("<f4")


def add(path: str, loader: str, error: str | None, match: str | None, why: str, **extra: object) -> None:
    case: dict[str, object] = {"path": path, "loader": loader, "error": error, "match": match, "why": why}
    case.update(extra)
    CASES.append(case)


def put(path: str, data: bytes) -> None:
    assert path not in FILES, path
    assert len(data) <= 8192, (path, len(data))  # commit-sized
    FILES[path] = data


def st_case(name: str, data: bytes, error: str | None, match: str | None, why: str) -> None:
    path = f"safetensors/{name}.safetensors"
    put(path, data)
    add(path, "safetensors", error, match, why)


def peft_folder(name: str, config: dict[str, object] | bytes | None,
                tensors: dict[str, tuple[str, np.ndarray]] | bytes | None,
                error: str | None, match: str | None, why: str, extra_files: dict[str, bytes] | None = None,
                top: str = "peft", loader: str = "load", **more: object) -> str:
    folder = f"{top}/{name}"
    if config is not None:
        put(f"{folder}/adapter_config.json",
            config if isinstance(config, bytes) else (json.dumps(config, indent=2) + "\n").encode())
    if tensors is not None:
        put(f"{folder}/adapter_model.safetensors",
            tensors if isinstance(tensors, bytes) else tensors_file(tensors, {"format": "pt"}))
    for rel, data in (extra_files or {}).items():
        put(f"{folder}/{rel}", data)
    add(folder, loader, error, match, why, **more)
    return folder


def kohya_case(name: str, data: bytes, error: str | None, match: str | None, why: str) -> None:
    path = f"kohya/{name}.safetensors"
    put(path, data)
    add(path, "load", error, match, why)


def config(**changes: object) -> dict[str, object]:
    cfg: dict[str, object] = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
                              "bias": "none", "lora_dropout": 0.0, "task_type": "CAUSAL_LM"}
    for k, v in changes.items():
        if v is _DROP:
            del cfg[k]
        else:
            cfg[k] = v
    return cfg


_DROP = object()


def lora(module: str = MODULE, a: np.ndarray | None = None, b: np.ndarray | None = None,
         dtype_a: str = "F32", dtype_b: str = "F32") -> dict[str, tuple[str, np.ndarray]]:
    a = f32(2, 4) if a is None else a
    b = f32(4, 2, start=1.0) if b is None else b
    return {f"{PREFIX}{module}.lora_A.weight": (dtype_a, a), f"{PREFIX}{module}.lora_B.weight": (dtype_b, b)}


def kohya(module: str = "lora_unet_mid_block_attentions_0_proj_in", down: np.ndarray | None = None,
          up: np.ndarray | None = None, alpha: tuple[str, np.ndarray] | None = ("F32", np.array(2.0, "<f4")),
          ) -> dict[str, tuple[str, np.ndarray]]:
    out: dict[str, tuple[str, np.ndarray]] = {}
    if alpha is not None:
        out[f"{module}.alpha"] = alpha
    if down is not False:  # type: ignore[comparison-overlap]
        out[f"{module}.lora_down.weight"] = ("F32", f32(2, 4) if down is None else down)
    if up is not False:  # type: ignore[comparison-overlap]
        out[f"{module}.lora_up.weight"] = ("F32", f32(4, 2, start=1.0) if up is None else up)
    return out


def esc(text: str) -> str:
    return re.escape(text)


# ----------------------------------------------------------------------------- the corpus


def safetensors_cases() -> None:
    one = {"a": entry("F32", [1], 0, 4)}
    st_case("valid", tensors_file({"a": ("F32", f32(2, 3)), "b": ("F16", np.arange(4, dtype="<f2")),
                                   "c": ("BF16", np.array([0x3F80, 0xC000], "<u2")),
                                   "d": ("F8_E4M3", np.array([0x38, 0xB8], np.uint8)),
                                   "e": ("I64", np.array([1, -2], "<i8")), "z": ("F32", np.zeros((0, 3), "<f4"))},
                                  {"format": "pt"}),
            None, None, "control: a valid file with several dtypes and an empty tensor")
    st_case("empty_file", b"", "FormatError", r"file is 0 bytes, too small", "zero bytes")
    st_case("short_file", b"\x10\0\0\0\0", "FormatError", r"file is 5 bytes, too small", "shorter than the length")
    st_case("header_len_past_end", st_bytes(b"{}", length=4096), "FormatError",
            r"header length 4096 runs past the end of the 10-byte file", "header length larger than the file")
    st_case("header_len_over_100mb", st_bytes(b"{}", length=100_000_001), "FormatError",
            r"header length 100000001 exceeds the 100000000-byte limit", "header length just over 100 MB")
    st_case("header_len_u64_max", st_bytes(b"{}", length=2**64 - 1), "FormatError",
            r"header length 18446744073709551615 exceeds", "header length 2**64 - 1")
    st_case("header_not_utf8", st_bytes(b'{"a\xff\xfe":{}}'), "FormatError", r"header is not valid UTF-8",
            "invalid UTF-8 in a tensor name")
    st_case("header_utf8_overlong", st_bytes(b'{"\xc0\xaf":{}}'), "FormatError", r"header is not valid UTF-8",
            "overlong UTF-8 encoding of '/'")
    st_case("header_not_json", st_bytes(b'{dtype: F32, shape: [1]}   '), "FormatError", r"header is not valid JSON",
            "not JSON")
    st_case("header_truncated_json", st_bytes(b'{"a": {"dtype": "F32",'), "FormatError", r"header is not valid JSON",
            "JSON cut short")
    st_case("header_json_array", st_bytes(b'[{"a": 1}]'), "FormatError", r"header does not start with '\{'",
            "JSON, but an array, not an object")
    st_case("header_json_string", st_bytes(b'"{}"'), "FormatError", r"header does not start with '\{'",
            "JSON, but a string")
    st_case("header_json_two_objects", st_bytes(b'{} {}'), "FormatError", r"header is not valid JSON",
            "an object followed by another")
    st_case("header_json_nan", st_bytes(b'{"__metadata__": {"k": NaN}}'), "FormatError",
            r"not valid JSON \(NaN is not a JSON value\)", "NaN literal (not JSON)")
    st_case("header_json_deep", st_bytes(b'{"a":' + b"[" * 3000 + b"]" * 3000 + b"}"), "FormatError",
            r"header is not valid JSON \(maximum recursion depth", "nesting deep enough to exhaust recursion")
    st_case("header_json_huge_int",
            st_bytes(b'{"a":{"dtype":"U8","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,1]}}', b"\0"),
            "FormatError", r"header is not valid JSON \(a number of 5000 digits", "an integer of 5000 digits")
    st_case("metadata_int_value", st_bytes({"__metadata__": {"k": 1}, **one}, b"\0" * 4), "FormatError",
            r"__metadata__ must map strings to strings: 'k' maps to 1", "non-string metadata value")
    st_case("metadata_null_value", st_bytes({"__metadata__": {"k": None}, **one}, b"\0" * 4), "FormatError",
            r"__metadata__ must map strings to strings: 'k' maps to None", "null metadata value")
    st_case("metadata_nested", st_bytes({"__metadata__": {"k": {"x": "y"}}, **one}, b"\0" * 4), "FormatError",
            r"'k' maps to \{'x': 'y'\}", "object as metadata value")
    st_case("metadata_list", st_bytes({"__metadata__": ["k", "v"], **one}, b"\0" * 4), "FormatError",
            r"__metadata__ must map strings to strings, got list", "metadata is a list")
    st_case("metadata_surrogate", st_bytes(b'{"__metadata__":{"k":"\\udc80"}}'), "FormatError",
            r"__metadata__ entry 'k' holds a lone UTF-16 surrogate", "an escaped lone surrogate in metadata")
    st_case("name_surrogate", st_bytes(b'{"\\ud800":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\0"),
            "FormatError", r"tensor name '\\ud800' holds a lone UTF-16 surrogate",
            "an escaped lone surrogate in a tensor name (could not be written back as UTF-8)")
    st_case("duplicate_name", st_bytes(b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                                       b'"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"\0\0"),
            "FormatError", r"duplicate key 'w'", "the same tensor name twice")
    st_case("duplicate_field", st_bytes(b'{"w":{"dtype":"U8","dtype":"F32","shape":[1],"data_offsets":[0,1]}}',
                                        b"\0"), "FormatError", r"duplicate key 'dtype'", "a field twice")
    st_case("entry_not_object", st_bytes({"a": [1, 2]}), "FormatError", r"entry for tensor 'a' is not an object",
            "tensor entry is a list")
    st_case("offsets_overlap", st_bytes({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, b"\0" * 12),
            "FormatError", r"tensor 'b' at offsets \[4, 12\] overlaps another tensor \('a' ends at 8\)",
            "two tensors share bytes")
    st_case("offsets_same", st_bytes({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 0, 4)}, b"\0" * 4),
            "FormatError", r"at offsets \[0, 4\] overlaps another tensor", "two tensors at the same offsets")
    st_case("offsets_gap", st_bytes({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, b"\0" * 12),
            "FormatError", r"tensor 'b' at offsets \[8, 12\] leaves a gap before it", "unused bytes between tensors")
    st_case("offsets_gap_at_start", st_bytes({"a": entry("F32", [1], 4, 8)}, b"\0" * 8), "FormatError",
            r"tensor 'a' at offsets \[4, 8\] leaves a gap", "data does not start at 0")
    st_case("offsets_out_of_range", st_bytes({"a": entry("F32", [250], 0, 1000)}, b"\0" * 8), "FormatError",
            r"tensors need 1000 data bytes but the file holds 8 .*tensor 'a' at offsets \[0, 1000\] is past the end",
            "a tensor ends past the end of the file")
    st_case("offsets_past_u64", st_bytes({"a": entry("U8", [0], 2**64, 2**64)}), "FormatError",
            r"tensor 'a' has invalid data_offsets \[18446744073709551616, 18446744073709551616\]",
            "offsets beyond 64 bits")
    st_case("offsets_reversed", st_bytes({"a": entry("U8", [0], 8, 4)}, b"\0" * 8), "FormatError",
            r"tensor 'a' has invalid data_offsets \[8, 4\]", "begin after end")
    st_case("offsets_negative", st_bytes({"a": entry("U8", [4], -4, 0)}, b"\0" * 4), "FormatError",
            r"tensor 'a' has invalid data_offsets \[-4, 0\]", "negative offset")
    st_case("offsets_float", st_bytes({"a": entry("U8", [4], 0.0, 4.0)}, b"\0" * 4), "FormatError",
            r"tensor 'a' has invalid data_offsets \[0\.0, 4\.0\]", "offsets are floats")
    st_case("offsets_string", st_bytes({"a": entry("U8", [4], "0", "4")}, b"\0" * 4), "FormatError",
            r"tensor 'a' has invalid data_offsets \['0', '4'\]", "offsets are strings")
    st_case("offsets_bool", st_bytes({"a": entry("U8", [1], False, True)}, b"\0"), "FormatError",
            r"tensor 'a' has invalid data_offsets \[False, True\]", "offsets are booleans")
    st_case("offsets_three", st_bytes({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 2]}}, b"\0"),
            "FormatError", r"invalid data_offsets \[0, 1, 2\]", "three offsets")
    st_case("offsets_missing", st_bytes({"a": {"dtype": "U8", "shape": [1]}}, b"\0"), "FormatError",
            r"tensor 'a' has invalid data_offsets None", "no data_offsets")
    st_case("shape_overflow_u64", st_bytes({"a": entry("U8", [2**32, 2**32], 0, 0)}), "FormatError",
            r"tensor 'a' with shape \[4294967296, 4294967296\] overflows 64-bit byte sizes",
            "element count overflows 64 bits")
    st_case("shape_overflow_itemsize", st_bytes({"a": entry("F64", [2**61], 0, 0)}), "FormatError",
            r"tensor 'a' with shape \[2305843009213693952\] overflows 64-bit",
            "byte size overflows only with the itemsize")
    st_case("shape_overflow_wraps_to_small", st_bytes({"a": entry("U8", [2**32, 2**32 + 1, 2**32], 0, 16)},
                                                      b"\0" * 16),
            "FormatError", r"tensor 'a' with shape .* overflows 64-bit", "product wraps around 2**64 to a small number")
    st_case("shape_overflow_after_zero", st_bytes({"a": entry("U8", [0, 2**63], 0, 0)}), "FormatError",
            r"tensor 'a' with shape \[0, 9223372036854775808\] overflows 64-bit",
            "zero elements, but no array can have that shape")
    st_case("shape_zero_elements_too_wide", st_bytes({"a": entry("F8_E5M2", [2**62, 0], 0, 0)}), "FormatError",
            r"tensor 'a' with shape \[4611686018427387904, 0\] overflows 64-bit",
            "fuzz finding: zero elements and 1-byte elements, but no float32 copy can have that shape")
    st_case("shape_negative", st_bytes({"a": entry("U8", [-1], 0, 1)}, b"\0"), "FormatError",
            r"tensor 'a' has invalid shape \[-1\]", "negative dimension")
    st_case("shape_negative_pair", st_bytes({"a": entry("U8", [-2, -2], 0, 4)}, b"\0" * 4), "FormatError",
            r"tensor 'a' has invalid shape \[-2, -2\]", "two negative dimensions whose product is positive")
    st_case("shape_float", st_bytes({"a": entry("U8", [2.0], 0, 2)}, b"\0\0"), "FormatError",
            r"tensor 'a' has invalid shape \[2\.0\]", "float dimension")
    st_case("shape_string", st_bytes({"a": entry("U8", ["2"], 0, 2)}, b"\0\0"), "FormatError",
            r"tensor 'a' has invalid shape \['2'\]", "string dimension")
    st_case("shape_bool", st_bytes({"a": entry("U8", [True], 0, 1)}, b"\0"), "FormatError",
            r"tensor 'a' has invalid shape \[True\]", "boolean dimension")
    st_case("shape_not_list", st_bytes({"a": entry("U8", 4, 0, 4)}, b"\0" * 4), "FormatError",  # type: ignore[arg-type]
            r"tensor 'a' has invalid shape 4", "shape is a number")
    st_case("shape_too_many_dims", st_bytes({"a": entry("U8", [1] * 70, 0, 1)}, b"\0"), "FormatError",
            r"tensor 'a' has 70 dimensions \(at most 32", "more dimensions than an array can have")
    st_case("shape_size_mismatch", st_bytes({"a": entry("F32", [3], 0, 8)}, b"\0" * 8), "FormatError",
            r"tensor 'a' of dtype F32 and shape \[3\] needs 12 bytes but its data_offsets span 8",
            "byte size differs from the offsets")
    st_case("dtype_unknown", st_bytes({"a": entry("F7", [1], 0, 1)}, b"\0"), "FormatError",
            r"tensor 'a' has unknown dtype 'F7'", "unknown dtype")
    st_case("dtype_lowercase", st_bytes({"a": entry("f32", [1], 0, 4)}, b"\0" * 4), "FormatError",
            r"tensor 'a' has unknown dtype 'f32'", "dtype in the wrong case")
    st_case("dtype_not_string", st_bytes({"a": entry(4, [1], 0, 4)}, b"\0" * 4),  # type: ignore[arg-type]
            "FormatError",
            r"tensor 'a' has unknown dtype 4", "dtype is a number")
    st_case("dtype_missing", st_bytes({"a": {"shape": [1], "data_offsets": [0, 1]}}, b"\0"), "FormatError",
            r"tensor 'a' has unknown dtype None", "no dtype")
    st_case("trailing_bytes", st_bytes({"a": entry("F32", [1], 0, 4)}, b"\0" * 7), "FormatError",
            r"3 trailing bytes after the last tensor \(the tensors end at data offset 4", "bytes after the data")
    st_case("trailing_bytes_no_tensors", st_bytes(b"{}      ", b"\0"), "FormatError", r"1 trailing bytes",
            "a byte after an empty header")
    big = 100 * 10**9
    liar = st_bytes({"big": entry("F32", [big // 4], 0, big)})
    st_case("declares_100gb", liar + b"\x01" * (1024 - len(liar)), "FormatError",
            rf"tensors need {big} data bytes but the file holds \d+ \(truncated\?\).*tensor 'big'",
            "a 1 KB file declaring a 100 GB tensor")


def checkpoint_cases() -> None:
    shard = tensors_file({"w.weight": ("F32", f32(2, 2))}, {"format": "pt"})

    def folder(name: str, index: bytes | None, why: str, error: str | None, match: str | None,
               files: dict[str, bytes] | None = None) -> None:
        base = f"checkpoint/{name}"
        put(f"{base}/model-00001-of-00001.safetensors", shard)
        if index is not None:
            put(f"{base}/model.safetensors.index.json", index)
        for rel, data in (files or {}).items():
            put(f"{base}/{rel}", data)
        add(base, "checkpoint", error, match, why)

    good = {"metadata": {"total_size": 16}, "weight_map": {"w.weight": "model-00001-of-00001.safetensors"}}
    folder("valid_sharded", json.dumps(good).encode(), "control: a valid sharded checkpoint", None, None)
    folder("index_not_json", b'{"weight_map": ', "index is not JSON", "FormatError",
           r"model\.safetensors\.index\.json: cannot read the shard index: not valid JSON")
    folder("index_not_utf8", b'{"weight_map": {"\xff": "x"}}', "index is not UTF-8", "FormatError",
           r"cannot read the shard index: not UTF-8")
    folder("index_deep", b"[" * 5000, "index nested deeply", "FormatError",
           r"cannot read the shard index: not valid JSON \(maximum recursion depth")
    folder("index_huge_int", b'{"metadata": {"total_size": ' + b"1" * 5000 + b'}, "weight_map": {}}',
           "an integer of 5000 digits", "FormatError",
           r"cannot read the shard index: not valid JSON \(a number of 5000")
    folder("index_weight_map_list", json.dumps({"weight_map": ["w.weight"]}).encode(), "weight_map is a list",
           "FormatError", r"'weight_map' must map tensor names to shard file names")
    folder("index_weight_map_int_values", json.dumps({"weight_map": {"w.weight": 1}}).encode(),
           "shard name is a number", "FormatError", r"'weight_map' must map tensor names to shard file names")
    folder("index_shard_escapes", json.dumps({"weight_map": {"w.weight": "../valid_sharded/model-00001-of-00001"
                                                                         ".safetensors"}}).encode(),
           "a shard path that leaves the folder", "FormatError",
           r"shard '\.\./valid_sharded/model-00001-of-00001\.safetensors' is not a file( name)? in")
    folder("index_shard_absolute", json.dumps({"weight_map": {"w.weight": "/etc/passwd"}}).encode(),
           "an absolute shard path", "FormatError", r"shard '/etc/passwd' is not a file( name)? in")
    folder("index_shard_nul", json.dumps({"weight_map": {"w.weight": "model\u0000.safetensors"}}).encode(),
           "a NUL in a shard name", "FormatError", r"shard 'model\\x00\.safetensors' is not a file( name)? in")
    folder("index_tensor_not_in_shard", json.dumps({"weight_map": {
        "w.weight": "model-00001-of-00001.safetensors", "x.weight": "model-00001-of-00001.safetensors"}}).encode(),
           "the index lists a tensor its shard lacks", "FormatError",
           r"tensor 'x\.weight' is listed in model-00001-of-00001\.safetensors but is not there")
    folder("index_bad_shard", json.dumps({"weight_map": {
        "w.weight": "model-00001-of-00001.safetensors", "v.weight": "model-00002-of-00002.safetensors"}}).encode(),
           "a listed shard whose header runs past its end", "FormatError",
           r"model-00002-of-00002\.safetensors: header length 999 runs past the end",
           files={"model-00002-of-00002.safetensors": st_bytes(b"{}", length=999)})
    put("checkpoint/single_file_bad.safetensors", st_bytes({"a": entry("F32", [3], 0, 8)}, b"\0" * 8))
    add("checkpoint/single_file_bad.safetensors", "checkpoint", "FormatError",
        r"tensor 'a' of dtype F32 and shape \[3\] needs 12 bytes", "a single-file checkpoint with a bad size")


def peft_cases() -> None:
    peft_folder("valid", config(), lora(), None, None, "control: a valid PEFT adapter")
    peft_folder("valid_embedding_dora", config(use_dora=True), {
        f"{PREFIX}model.embed_tokens.lora_embedding_A": ("F32", f32(2, 6)),
        f"{PREFIX}model.embed_tokens.lora_embedding_B": ("F32", f32(4, 2)),
        **lora(),
        f"{PREFIX}{MODULE}.lora_magnitude_vector": ("F32", f32(4, start=1.0)),
        f"{PREFIX}lm_head.weight": ("F32", f32(6, 4)),
    }, None, None, "control: embedding, DoRA magnitude and a modules_to_save tensor")
    # adapter_config.json
    cfg_err = "FormatError"
    peft_folder("config_invalid_json", b'{"r": 2, "lora_alpha": ', lora(), cfg_err,
                r"adapter_config\.json: cannot read the adapter config: not valid JSON", "config cut short")
    peft_folder("config_not_utf8", b'{"r": 2, "lora_alpha": 4, "x": "\xff"}', lora(), cfg_err,
                r"adapter_config\.json: cannot read the adapter config: not UTF-8", "config is not UTF-8")
    peft_folder("config_empty", b"", lora(), cfg_err, r"cannot read the adapter config: not valid JSON",
                "empty config")
    peft_folder("config_not_object", b"[2, 4]\n", lora(), cfg_err,
                r"adapter_config\.json: adapter config is not a JSON object \(it is list\)", "config is a list")
    peft_folder("config_null", b"null\n", lora(), cfg_err, r"adapter config is not a JSON object \(it is NoneType\)",
                "config is null")
    peft_folder("config_deep", b'{"r": 2, "x": ' + b"[" * 3000 + b"]" * 3000 + b"}", lora(), cfg_err,
                r"cannot read the adapter config: not valid JSON \(maximum recursion depth", "config nested deeply")
    peft_folder("config_huge_int", b'{"r": 2, "lora_alpha": ' + b"7" * 5000 + b"}", lora(), cfg_err,
                r"cannot read the adapter config: not valid JSON \(a number of 5000", "lora_alpha of 5000 digits")
    peft_folder("config_r_string", config(r="2"), lora(), cfg_err, r"'r' must be a positive integer, got '2'",
                "r as a string")
    peft_folder("config_r_negative", config(r=-2), lora(), cfg_err, r"'r' must be a positive integer, got -2",
                "negative r")
    peft_folder("config_r_zero", config(r=0), lora(), cfg_err, r"'r' must be a positive integer, got 0", "r of 0")
    peft_folder("config_r_float", config(r=2.0), lora(), cfg_err, r"'r' must be a positive integer, got 2\.0",
                "r as a float")
    peft_folder("config_r_bool", config(r=True), lora(), cfg_err, r"'r' must be a positive integer, got True",
                "r as a boolean")
    peft_folder("config_r_missing", config(r=_DROP), lora(), cfg_err, r"'r' is missing", "no r")
    peft_folder("config_lora_alpha_missing", config(lora_alpha=_DROP), lora(), cfg_err, r"'lora_alpha' is missing",
                "no lora_alpha")
    peft_folder("config_lora_alpha_string", config(lora_alpha="4"), lora(), cfg_err,
                r"'lora_alpha' must be a number, got '4'", "lora_alpha as a string")
    peft_folder("config_lora_alpha_nan", b'{"r": 2, "lora_alpha": NaN}', lora(), cfg_err,
                r"'lora_alpha' must be a number, got nan", "lora_alpha NaN")
    peft_folder("config_lora_alpha_too_big", b'{"r": 2, "lora_alpha": 1' + b"0" * 400 + b"}", lora(), cfg_err,
                r"'lora_alpha' must be a number, got 1000", "lora_alpha an integer too large for a float")
    peft_folder("config_target_modules_int", config(target_modules=5), lora(), cfg_err,
                r"'target_modules' must be a string, a list of strings or null, got 5", "target_modules a number")
    peft_folder("config_target_modules_dict", config(target_modules={"q_proj": 1}), lora(), cfg_err,
                r"'target_modules' must be a string, a list of strings or null", "target_modules an object")
    peft_folder("config_target_modules_mixed", config(target_modules=["q_proj", 3]), lora(), cfg_err,
                r"'target_modules' must be a string, a list of strings or null", "target_modules with a number")
    peft_folder("config_modules_to_save_string", config(modules_to_save="lm_head"), lora(), cfg_err,
                r"'modules_to_save' must be a list of strings or null, got 'lm_head'", "modules_to_save a string")
    peft_folder("config_use_rslora_string", config(use_rslora="yes"), lora(), cfg_err,
                r"'use_rslora' must be true or false, got 'yes'", "use_rslora a string")
    peft_folder("config_rank_pattern_list", config(rank_pattern=["q_proj"]), lora(), cfg_err,
                r"'rank_pattern' must be an object", "rank_pattern a list")
    peft_folder("config_rank_pattern_zero", config(rank_pattern={"q_proj": 0}), lora(), cfg_err,
                r"rank_pattern\['q_proj'\] must be a positive integer, got 0", "rank_pattern value 0")
    peft_folder("config_alpha_pattern_inf", b'{"r": 2, "lora_alpha": 4, "alpha_pattern": {"q_proj": Infinity}}',
                lora(), cfg_err, r"alpha_pattern\['q_proj'\] must be a finite number, got inf",
                "alpha_pattern value Infinity")
    peft_folder("config_pattern_not_regex", config(rank_pattern={"q_proj(": 2}), lora(), cfg_err,
                r"rank_pattern pattern 'q_proj\(' is not a regular expression", "unbalanced parenthesis")
    peft_folder("config_pattern_repeat_overflow", config(alpha_pattern={"a{99999999999}": 2}), lora(), cfg_err,
                r"alpha_pattern pattern 'a\{99999999999\}' is not a regular expression", "repeat count overflows")
    peft_folder("config_pattern_redos_nested", config(rank_pattern={"(x+x+)+y": 2}),
                lora(module="model.layers.0." + "x" * 40), cfg_err,
                r"rank_pattern pattern '\(x\+x\+\)\+y' has a quantifier inside a quantifier",
                "catastrophic backtracking (exponential in the module name's length)")
    peft_folder("config_pattern_redos_alternation", config(alpha_pattern={"(?:q|q)*z": 2}), lora(), cfg_err,
                r"has a quantified alternation", "ambiguous quantified alternation")
    peft_folder("config_pattern_backreference", config(alpha_pattern={r"(q)\1": 2}), lora(), cfg_err,
                r"has a backreference", "backreference")
    peft_folder("config_pattern_many_stars", config(rank_pattern={".*.*.*.*x": 2}), lora(), cfg_err,
                r"has 4 repeating quantifiers \(at most 2\)", "polynomial backtracking")
    peft_folder("config_peft_type_loha", config(peft_type="LOHA"), lora(), "UnsupportedError",
                r"peft_type 'LOHA' is not a LoRA adapter", "not a LoRA adapter")
    # the tensors
    peft_folder("rank_disagrees_with_config", config(r=4), lora(), "ShapeMismatchError",
                rf"module '{esc(MODULE)}': adapter_config\.json says r=4 but the tensors have rank 2",
                "config r differs from the tensors' rank")
    peft_folder("factors_rank_disagree", config(), lora(b=f32(4, 3)), "ShapeMismatchError",
                rf"module '{esc(MODULE)}': lora_A\.weight \(2, 4\) and lora_B\.weight \(4, 3\) are not LoRA factors "
                "of one rank", "A has 2 rows, B 3 columns")
    peft_folder("zero_rank", config(), lora(a=np.zeros((0, 4), "<f4"), b=np.zeros((4, 0), "<f4")),
                "ShapeMismatchError", r"lora_A\.weight \(0, 4\) has rank 0 \(a zero-rank adapter\)", "rank 0")
    peft_folder("factors_1d", config(), lora(a=f32(4), b=f32(4)), "ShapeMismatchError",
                r"lora_A\.weight \(4,\) and lora_B\.weight \(4,\) are not LoRA factors", "vectors, not matrices")
    peft_folder("factors_scalar", config(), lora(a=f32(), b=f32()), "ShapeMismatchError",
                r"lora_A\.weight \(\) and lora_B\.weight \(\) are not LoRA factors", "scalars")
    peft_folder("factors_ndim_differ", config(), lora(b=f32(4, 2, 1, 1)), "ShapeMismatchError",
                r"lora_A\.weight \(2, 4\) and lora_B\.weight \(4, 2, 1, 1\) are not LoRA factors",
                "a matrix and a conv kernel")
    peft_folder("missing_lora_B", config(), dict(list(lora().items())[:1]), "FormatError",
                rf"module '{esc(MODULE)}' has no lora_B\.weight", "half of a pair")
    peft_folder("integer_factor", config(), lora(a=np.arange(8, dtype="<i4").reshape(2, 4), dtype_a="I32"),
                "FormatError", r"lora_A\.weight has non-float dtype I32", "integer factor")
    peft_folder("magnitude_integer", config(use_dora=True),
                {**lora(), f"{PREFIX}{MODULE}.lora_magnitude_vector": ("I32", np.arange(4, dtype="<i4"))},
                "FormatError", r"lora_magnitude_vector has non-float dtype I32", "integer DoRA magnitude")
    peft_folder("duplicate_module_role", config(), {**lora(), f"{MODULE}.lora_A.weight": ("F32", f32(2, 4))},
                "FormatError", rf"module '{esc(MODULE)}' has two A tensors: '{esc(PREFIX + MODULE)}\.lora_A\.weight'"
                rf" and '{esc(MODULE)}\.lora_A\.weight'", "the same factor with and without the prefix")
    peft_folder("embedding_and_linear", config(), {**lora(), f"{PREFIX}{MODULE}.lora_embedding_A": ("F32", f32(2, 4)),
                                                   f"{PREFIX}{MODULE}.lora_embedding_B": ("F32", f32(4, 2))},
                "FormatError", r"has both lora_embedding_A/B and lora_A/B tensors", "one module, two layouts")
    peft_folder("full_tensor_twice", config(), {**lora(), f"{PREFIX}lm_head.weight": ("F32", f32(2, 2)),
                                                f"{PREFIX}lm_head.base_layer.weight": ("F32", f32(2, 2))},
                "FormatError", r"tensors 'lm_head\.weight' and 'lm_head\.base_layer\.weight' both replace the base "
                r"weight 'lm_head\.weight'", "two replacements for one base weight")
    peft_folder("unknown_lora_tensor", config(), {**lora(), f"{PREFIX}{MODULE}.lora_C.weight": ("F32", f32(2))},
                "FormatError", r"tensor 'base_model\.model\..*\.lora_C\.weight' is not a LoRA tensor lorafuse knows",
                "an unknown LoRA role")
    for name, module, match in [
        ("name_dotdot_slash", "../../../etc/passwd", r"module name '\.\./\.\./\.\./etc/passwd' holds a path separator"),
        ("name_backslash", "model\\..\\x", r"module name 'model\\\\\.\.\\\\x' holds a path separator"),
        ("name_nul", "model.layers.0\u0000.q_proj", r"module name 'model\.layers\.0\\x00\.q_proj' holds the "
                                                     r"non-printable character U\+0000"),
        ("name_escape", "model.\u001b[31mred", r"non-printable character U\+001B"),
        ("name_newline", "model.layers.0\n.q_proj", r"non-printable character U\+000A"),
        ("name_bidi_override", "model.\u202eq_proj", r"non-printable character U\+202E"),
        ("name_empty_component", "model..q_proj", r"module name 'model\.\.q_proj' has an empty component"),
        ("name_empty", "", r"module name '' is empty"),
        ("name_too_long", "m" * 1100, r"has 1100 characters \(at most 1024\)"),
    ]:
        peft_folder(name, config(), lora(module=module), "FormatError", match, f"module name {module[:40]!r}")
    peft_folder("modules_to_save_name_nul", config(), {**lora(), f"{PREFIX}lm_head\u0000.weight": ("F32", f32(2))},
                "FormatError", r"tensor name 'lm_head\\x00\.weight' holds the non-printable character U\+0000",
                "a NUL in a full tensor's name")
    # the weights file
    peft_folder("weights_missing", config(), None, "FormatError", r"adapter_model\.safetensors not found",
                "config only")
    peft_folder("weights_pickle_only", config(), None, "FormatError", r"adapter_model\.bin: pickle checkpoints are "
                r"not read by lorafuse", "a pickle instead of safetensors",
                extra_files={"adapter_model.bin": b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00."})
    peft_folder("weights_bad_header", config(), st_bytes(b"{}", length=77), "FormatError",
                r"adapter_model\.safetensors: header length 77 runs past the end of the 10-byte file",
                "the weights' header runs past the end")
    weights = st_bytes({f"{PREFIX}{MODULE}.lora_A.weight": entry("F32", [25 * 10**9, 1], 0, 10**11),
                        f"{PREFIX}{MODULE}.lora_B.weight": entry("F32", [1, 1], 10**11, 10**11 + 4)})
    peft_folder("weights_declare_100gb", config(r=25 * 10**9), weights + b"\0" * (1024 - len(weights)), "FormatError",
                r"tensors need 100000000004 data bytes but the file holds \d+ \(truncated\?\)",
                "weights declaring a 100 GB factor")


def kohya_cases() -> None:
    m = "lora_unet_mid_block_attentions_0_proj_in"
    kohya_case("valid", tensors_file(kohya(), {"ss_network_dim": "2"}), None, None, "control: a valid kohya file")
    kohya_case("ranks_mismatch", tensors_file(kohya(down=f32(4, 8), up=f32(8, 2))), "ShapeMismatchError",
               rf"module '{m}': lora_down \(4, 8\) and lora_up \(8, 2\) are not LoRA factors of one rank",
               "down has rank 4, up rank 2")
    kohya_case("missing_up", tensors_file(kohya(up=False)), "FormatError",  # type: ignore[arg-type]
               rf"module '{m}' has no lora_up\.weight \(only lora_down\.weight \(2, 4\), alpha \(\)\)", "no up")
    kohya_case("missing_down", tensors_file(kohya(down=False)), "FormatError",  # type: ignore[arg-type]
               rf"module '{m}' has no lora_down\.weight", "no down")
    kohya_case("alpha_only", tensors_file({f"{m}.alpha": ("F32", np.array(2.0, "<f4")),
                                           "lora_unet_x.lora_down.weight": ("F32", f32(2, 4)),
                                           "lora_unet_x.lora_up.weight": ("F32", f32(4, 2))}),
               "FormatError", rf"module '{m}' has no lora_down\.weight \(only alpha \(\)\)",
               "an alpha and nothing else")
    kohya_case("alpha_vector", tensors_file(kohya(alpha=("F32", f32(2)))), "FormatError",
               rf"module '{m}': alpha must be a scalar, got shape \(2,\)", "alpha of shape (2,)")
    kohya_case("alpha_matrix", tensors_file(kohya(alpha=("F32", f32(2, 2)))), "FormatError",
               r"alpha must be a scalar, got shape \(2, 2\)", "alpha of shape (2, 2)")
    kohya_case("alpha_empty", tensors_file(kohya(alpha=("F32", np.zeros((0,), "<f4"))))
               , "FormatError", r"alpha must be a scalar, got shape \(0,\)", "alpha with no element")
    kohya_case("alpha_bool", tensors_file(kohya(alpha=("BOOL", np.array(True)))), "FormatError",
               r"alpha has dtype BOOL", "boolean alpha")
    kohya_case("alpha_nan", tensors_file(kohya(alpha=("F32", np.array(np.nan, "<f4")))), "FormatError",
               rf"module '{m}': alpha is nan", "NaN alpha")
    kohya_case("zero_rank", tensors_file(kohya(down=np.zeros((0, 4), "<f4"), up=np.zeros((4, 0), "<f4"))),
               "ShapeMismatchError", r"lora_down \(0, 4\) has rank 0 \(a zero-rank adapter\)", "rank 0")
    kohya_case("down_3d", tensors_file(kohya(down=f32(2, 4, 1), up=f32(4, 2, 1))), "ShapeMismatchError",
               r"lora_down \(2, 4, 1\) and lora_up \(4, 2, 1\) are not LoRA factors", "3-D factors")
    kohya_case("integer_factor", tensors_file({f"{m}.lora_down.weight": ("I32", np.zeros((2, 4), "<i4")),
                                               f"{m}.lora_up.weight": ("F32", f32(4, 2))}),
               "FormatError", r"lora_down\.weight has non-float dtype I32", "integer factor")
    kohya_case("name_slash", tensors_file(kohya(module="lora_unet_a/b")), "FormatError",
               r"module name 'lora_unet_a/b' holds a path separator", "a '/' in the module name")
    kohya_case("name_nul", tensors_file(kohya(module="lora_unet_\u0000")), "FormatError",
               r"module name 'lora_unet_\\x00' holds the non-printable character U\+0000", "a NUL in the module name")
    kohya_case("name_escape", tensors_file(kohya(module="lora_unet_\u001b]0;pwned\u0007")), "FormatError",
               r"non-printable character U\+001B", "a terminal escape sequence in the module name")
    kohya_case("not_kohya_key", tensors_file({**kohya(), "lora_unet_x.lora_down.weight.extra": ("F32", f32(1))}),
               "FormatError", r"tensor 'lora_unet_x\.lora_down\.weight\.extra' is not a kohya LoRA tensor",
               "a tensor that is not a kohya name")
    kohya_case("lycoris", tensors_file({**kohya(), f"{m}.hada_w1_a": ("F32", f32(2, 2))}), "UnsupportedError",
               r"has the LyCORIS tensor 'lora_unet_mid_block_attentions_0_proj_in\.hada_w1_a'", "a LoHa tensor")
    kohya_case("bad_header", st_bytes(b'{"lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [2, 2], '
                                      b'"data_offsets": [0, 16]}}', b"\0" * 8), "FormatError",
               r"tensors need 16 data bytes but the file holds 8", "truncated: the header error, not 'unrecognised'")
    weights = st_bytes({f"{m}.lora_down.weight": entry("F32", [25 * 10**9, 1], 0, 10**11),
                        f"{m}.lora_up.weight": entry("F32", [1, 25 * 10**9], 10**11, 2 * 10**11)})
    kohya_case("declares_200gb", weights + b"\0" * (1024 - len(weights)), "FormatError",
               r"tensors need 200000000000 data bytes but the file holds \d+ \(truncated\?\)",
               "a 1 KB kohya file declaring 200 GB of factors")


def nonfinite_cases() -> None:
    """NaN / Inf payloads: valid files. Loading works; apply reports the module; --allow-nonfinite writes."""
    base = "nonfinite/base"
    w = f32(4, 4)
    put(f"{base}/model.safetensors", tensors_file({f"{MODULE}.weight": ("F32", w),
                                                   "model.norm.weight": ("F32", f32(4))}, {"format": "pt"}))
    put(f"{base}/config.json", b'{"model_type": "llama"}\n')
    add(base, "checkpoint", None, None, "control: the base the non-finite adapters merge into")
    base_inf = "nonfinite/base_inf"
    w_inf = w.copy()
    w_inf[1, 2] = np.inf
    put(f"{base_inf}/model.safetensors", tensors_file({f"{MODULE}.weight": ("F32", w_inf),
                                                       "model.norm.weight": ("F32", f32(4))}, {"format": "pt"}))
    add(base_inf, "checkpoint", None, None, "a base weight holding +Inf (valid file)")
    a_nan = f32(2, 4)
    a_nan[1, 3] = np.nan
    b_inf = f32(4, 2, start=1.0)
    b_inf[0, 0] = -np.inf
    msg = rf"NaN or Inf in the merged weights of {esc(MODULE)}\.weight.*--allow-nonfinite"
    for name, tensors, target in (("adapter_nan", lora(a=a_nan), base), ("adapter_inf", lora(b=b_inf), base),
                                  ("adapter_clean", lora(), base_inf)):
        folder = peft_folder(name, config(), tensors, None, None, f"{name}: loads (the values are valid floats)",
                             top="nonfinite")
        add(folder, "apply", "NonFiniteError", msg, f"apply of {name} into {target}: names the module", base=target)
    kohya_nan = f32(2, 4)
    kohya_nan[0, 0] = np.nan
    put("nonfinite/kohya_nan.safetensors", tensors_file(kohya(down=kohya_nan)))
    add("nonfinite/kohya_nan.safetensors", "load", None, None, "a kohya file with a NaN factor loads")


# ----------------------------------------------------------------------------- output


def build() -> tuple[dict[str, bytes], list[dict[str, object]]]:
    CASES.clear()
    FILES.clear()
    safetensors_cases()
    checkpoint_cases()
    peft_cases()
    kohya_cases()
    nonfinite_cases()
    paths = [c["path"] for c in CASES if c["loader"] != "apply"]
    assert len(paths) == len(set(paths)), "duplicate case paths"
    for c in CASES:
        if c["match"] is not None:
            re.compile(str(c["match"]))
    lines = ",\n".join("  " + json.dumps(c, ensure_ascii=True) for c in CASES)
    about = json.dumps("hostile inputs, generated by tests/data/make_hostile.py: do not edit by hand")
    files = dict(FILES)
    files[MANIFEST] = f'{{"about": {about},\n "cases": [\n{lines}\n]}}\n'.encode()
    return files, list(CASES)


def write(out: Path) -> int:
    files, _ = build()
    if out.exists():
        if any(out.iterdir()) and not (out / MANIFEST).is_file():
            raise SystemExit(f"{out} is not empty and holds no {MANIFEST}: refusing to replace it")
        shutil.rmtree(out)
    for rel, data in sorted(files.items()):
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return len(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"corpus folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    n = write(args.out)
    print(f"wrote {n} files ({len(CASES)} cases) under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
