"""safetensors reading and writing against the real `safetensors` package, the
validation of DESIGN section 3 on hand-built files, sharded checkpoints, atomic
outputs."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from safetensors import safe_open

import lorafuse
from lorafuse.io.atomic import atomic_dir, atomic_file
from lorafuse.io.checkpoint import Checkpoint
from lorafuse.io.safetensors import (
    MAX_HEADER_BYTES,
    SafetensorsFile,
    SafetensorsWriter,
    TensorSpec,
    read_header,
    save_file,
)
from lorafuse.io.tensor import Tensor

FormatError = lorafuse.FormatError


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def header_of(path: Path) -> tuple[int, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, data[8 : 8 + n]


# ---------------------------------------------------------------- interop: reference writes, lorafuse reads


def test_read_files_written_by_safetensors_numpy(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal((4, 2, 3)).astype(np.float16),
        "f64": rng.standard_normal(7),
        "i64": rng.integers(-(2**62), 2**62, size=(2, 3), dtype=np.int64),
        "i32": np.array([-1, 0, 2**31 - 1], np.int32),
        "u8": np.arange(11, dtype=np.uint8),
        "bool": np.array([[True, False, True], [False, False, True]]),
        "scalar": np.array(3.25, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "empty2": np.zeros((2, 0, 3), np.float16),
    }
    meta = {"format": "np", "note": "ünïcödé ✓", "empty": ""}
    path = tmp_path / "np.safetensors"
    safetensors.numpy.save_file(tensors, str(path), metadata=meta)
    with SafetensorsFile(path) as f:
        assert sorted(f.keys()) == sorted(tensors)
        assert f.metadata == meta
        expect_dtype = {"f32": "F32", "f16": "F16", "f64": "F64", "i64": "I64", "i32": "I32", "u8": "U8",
                        "bool": "BOOL", "scalar": "F32", "empty": "F32", "empty2": "F16"}
        for name, arr in tensors.items():
            info = f.info(name)
            assert info.dtype == expect_dtype[name]
            assert info.shape == arr.shape
            got = f.raw(name)
            assert got.dtype == arr.dtype and got.shape == arr.shape
            np.testing.assert_array_equal(got, arr)
            assert info.nbytes == arr.nbytes
        assert f.raw("scalar").shape == () and float(f.raw("scalar")) == 3.25
        assert "f32" in f and "nope" not in f
        with pytest.raises(FormatError, match="no tensor named 'nope'"):
            f.raw("nope")


def test_read_files_written_by_safetensors_torch(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {
        "bf16": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "bf16_special": torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, 3.0e38], dtype=torch.bfloat16),
        "f16": torch.randn(3, 3, generator=g).to(torch.float16),
        "f32": torch.randn(2, 3, 4, generator=g),
        "i64": torch.tensor([[-5, 2**40], [7, -(2**63)]], dtype=torch.int64),
        "bool": torch.tensor([True, False, False, True]),
        "scalar_bf16": torch.tensor(1.5, dtype=torch.bfloat16),
        "zero": torch.zeros(0, 3, dtype=torch.bfloat16),
        "f8": torch.tensor([0.5, -448.0, 0.001953125], dtype=torch.float8_e4m3fn),
        "f8b": torch.tensor([57344.0, -1.5, float("inf")], dtype=torch.float8_e5m2),
    }
    meta = {"format": "pt", "ss_network_dim": "16"}
    path = tmp_path / "pt.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata=meta)
    with SafetensorsFile(path) as f:
        assert f.metadata == meta
        assert {n: f.info(n).dtype for n in f.keys()} == {
            "bf16": "BF16", "bf16_special": "BF16", "f16": "F16", "f32": "F32", "i64": "I64", "bool": "BOOL",
            "scalar_bf16": "BF16", "zero": "BF16", "f8": "F8_E4M3", "f8b": "F8_E5M2"}
        for name in ("bf16", "bf16_special", "scalar_bf16", "zero"):
            got = f.raw(name)
            assert got.dtype == np.uint16 and got.shape == tuple(tensors[name].shape)
            np.testing.assert_array_equal(got, bf16_bits(tensors[name]))
            # and as floats, through the core
            np.testing.assert_array_equal(Tensor(got, "BF16").f32(), tensors[name].float().numpy())
        np.testing.assert_array_equal(f.raw("f16"), tensors["f16"].numpy())
        np.testing.assert_array_equal(f.raw("f32"), tensors["f32"].numpy())
        np.testing.assert_array_equal(f.raw("i64"), tensors["i64"].numpy())
        np.testing.assert_array_equal(f.raw("bool"), tensors["bool"].numpy())
        np.testing.assert_array_equal(Tensor(f.raw("f8"), "F8_E4M3").f32(), [0.5, -448.0, 0.001953125])
        np.testing.assert_array_equal(Tensor(f.raw("f8b"), "F8_E5M2").f32(), [57344.0, -1.5, np.inf])


def test_views_are_read_only_and_zero_copy(tmp_path):
    path = tmp_path / "a.safetensors"
    arr = np.arange(1000, dtype=np.float32)
    safetensors.numpy.save_file({"a": arr}, str(path))
    f = SafetensorsFile(path)
    view = f.raw("a")
    assert not view.flags.writeable and not view.flags.owndata
    with pytest.raises(ValueError):
        view[0] = 1
    f.close()


# ---------------------------------------------------------------- interop: lorafuse writes, reference reads


def check_layout(path: Path) -> bytes:
    n, header = header_of(path)
    assert header[:1] == b"{"
    assert (8 + n) % 8 == 0, "data must start 8-byte aligned"
    body = header.rstrip(b" ")
    assert header[len(body):] == b" " * (n - len(body)) and len(header) - len(body) < 8
    json.loads(body)
    return header


def test_save_file_is_read_by_safetensors(tmp_path):
    rng = np.random.default_rng(2)
    bf = torch.randn(6, 5, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    data = {
        "w.f32": ("F32", rng.standard_normal((4, 6)).astype(np.float32)),
        "w.f16": ("F16", rng.standard_normal((3,)).astype(np.float16)),
        "w.bf16": ("BF16", bf16_bits(bf)),
        "w.i64": ("I64", np.array([[1, -2], [2**62, 0]], np.int64)),
        "w.bool": ("BOOL", np.array([True, False, True])),
        "w.scalar": ("F32", np.array(-2.5, np.float32)),
        "w.empty": ("F16", np.zeros((0, 3), np.float16)),
        "w.f64": ("F64", rng.standard_normal(3)),
    }
    meta = {"format": "pt", "lorafuse": "ü ✓", "x": ""}
    path = tmp_path / "out.safetensors"
    save_file(data, path, metadata=meta)
    check_layout(path)

    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == meta
        assert sorted(f.keys()) == sorted(data)
        got = f.get_tensor("w.bf16")
        assert got.dtype == torch.bfloat16
        np.testing.assert_array_equal(bf16_bits(got), bf16_bits(bf))
        assert torch.equal(got, bf)
        for name, (_, arr) in data.items():
            if name == "w.bf16":
                continue
            t = f.get_tensor(name)
            assert tuple(t.shape) == arr.shape
            np.testing.assert_array_equal(t.numpy(), arr)
    numpy_names = [n for n in data if n != "w.bf16"]
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == meta
        for name in numpy_names:
            arr = data[name][1]
            got = f.get_tensor(name)
            assert got.dtype == arr.dtype and got.shape == arr.shape
            np.testing.assert_array_equal(got, arr)
    loaded = safetensors.torch.load_file(str(path))
    assert torch.equal(loaded["w.bf16"], bf)
    # and we read back our own file
    with SafetensorsFile(path) as f:
        assert f.metadata == meta
        for name, (dtype, arr) in data.items():
            assert f.info(name).dtype == dtype
            np.testing.assert_array_equal(f.raw(name), arr)


def test_header_is_padded_with_spaces_to_eight_bytes(tmp_path):
    seen_padding = set()
    for k in range(8):  # tensor names of 8 different lengths: every amount of padding happens
        path = tmp_path / f"p{k}.safetensors"
        save_file({"t" * (k + 1): ("F32", np.arange(3, dtype=np.float32))}, path)
        n, header = header_of(path)
        check_layout(path)
        seen_padding.add(len(header) - len(header.rstrip(b" ")))
        with safe_open(str(path), framework="numpy") as f:
            np.testing.assert_array_equal(f.get_tensor("t" * (k + 1)), [0, 1, 2])
        assert path.stat().st_size == 8 + n + 12
    assert seen_padding == set(range(8))
    # no metadata at all, no tensors: still a valid file
    path = tmp_path / "empty.safetensors"
    save_file({}, path)
    check_layout(path)
    with safe_open(str(path), framework="numpy") as f:
        assert list(f.keys()) == []


def test_writer_copy_from_another_file(tmp_path):
    src_path = tmp_path / "src.safetensors"
    bf = torch.randn(33, 17, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    big = np.random.default_rng(5).standard_normal((300, 257)).astype(np.float32)
    safetensors.torch.save_file({"a": bf, "big": torch.from_numpy(big), "z": torch.zeros(0)}, str(src_path))
    extra = np.arange(10, dtype=np.float16)
    out = tmp_path / "dst.safetensors"
    with SafetensorsFile(src_path) as src:
        specs = [TensorSpec("copied.big", "F32", (300, 257)), TensorSpec("new", "F16", (10,)),
                 TensorSpec("copied.a", "BF16", (33, 17)), TensorSpec("copied.z", "F32", (0,))]
        with SafetensorsWriter(out, specs, {"source": "src"}) as w:
            w.copy_from("copied.big", src, "big")
            w.write("new", extra)
            w.copy_from("copied.a", src, "a")
            w.copy_from("copied.z", src, "z")
    check_layout(out)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"source": "src"}
        assert sorted(f.keys()) == ["copied.a", "copied.big", "copied.z", "new"]
        assert torch.equal(f.get_tensor("copied.a"), bf)
        np.testing.assert_array_equal(f.get_tensor("copied.big").numpy(), big)
        np.testing.assert_array_equal(f.get_tensor("new").numpy(), extra)
        assert tuple(f.get_tensor("copied.z").shape) == (0,)
    with safe_open(str(out), framework="numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("copied.big"), big)


def test_writer_refuses_out_of_order_and_incomplete_writes(tmp_path):
    specs = [TensorSpec("a", "F32", (2,)), TensorSpec("b", "F32", (3,))]
    with pytest.raises(lorafuse.LorafuseValueError, match=r"expected tensor 'a'.*got 'b'"):
        with SafetensorsWriter(tmp_path / "x.safetensors", specs) as w:
            w.write("b", np.zeros(3, np.float32))
    with pytest.raises(lorafuse.LorafuseValueError, match=r"12 bytes"):
        with SafetensorsWriter(tmp_path / "y.safetensors", specs) as w:
            w.write("a", np.zeros(3, np.float32))
    with pytest.raises(lorafuse.LorafuseValueError, match=r"closed after 1 of 2 tensors"):
        with SafetensorsWriter(tmp_path / "z.safetensors", specs) as w:
            w.write("a", np.zeros(2, np.float32))
    with pytest.raises(lorafuse.LorafuseValueError, match="cannot hold BF16"):
        save_file({"a": ("BF16", np.zeros(2, np.float32))}, tmp_path / "w.safetensors")
    with pytest.raises(lorafuse.LorafuseValueError, match="metadata must map strings to strings"):
        save_file({}, tmp_path / "m.safetensors", metadata={"a": 1})


# ---------------------------------------------------------------- validation on hand-built files


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def build(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def reference_rejects(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="numpy") as f:
            for k in f.keys():
                f.get_tensor(k)
    except Exception:
        return True
    return False


def test_hand_built_valid_file_reads(tmp_path):
    # the control for every case below: the same construction, nothing wrong
    header = {"__metadata__": {"k": "v"}, "a": entry("F32", [2], 0, 8), "b": entry("U8", [2, 2], 8, 12),
              "z": entry("F16", [0, 3], 12, 12)}
    data = np.array([1.5, -2.0], np.float32).tobytes() + bytes([1, 2, 3, 4])
    path = build(tmp_path / "ok.safetensors", header, data)
    with SafetensorsFile(path) as f:
        assert f.metadata == {"k": "v"}
        np.testing.assert_array_equal(f.raw("a"), [1.5, -2.0])  # unaligned data start: copied, still right
        np.testing.assert_array_equal(f.raw("b"), [[1, 2], [3, 4]])
        assert f.raw("z").shape == (0, 3)
    assert not reference_rejects(path)
    tensors, meta, start = read_header(path)
    assert start == 8 + len(json.dumps(header).encode()) and set(tensors) == {"a", "b", "z"}


def good(name="a", dtype="F32", shape=(1,), begin=0):
    size = {"F32": 4, "F16": 2, "U8": 1}[dtype] * int(np.prod(shape))
    return {name: entry(dtype, list(shape), begin, begin + size)}


# (id, header (dict or raw bytes), data, forced header length or None, message fragments, reference rejects too)
CASES = [
    ("header_too_long", b'{"a":1}', b"", MAX_HEADER_BYTES + 1, ["header length 100000001", "limit"], True),
    ("header_past_end", b'{}', b"", 1000, ["header length 1000", "past the end", "10-byte file"], True),
    ("invalid_utf8", b'{"a\xff\xfe": {}}', b"", None, ["not valid UTF-8"], True),
    ("invalid_json", b'{"a": {"dtype": "F32",', b"", None, ["not valid JSON"], True),
    ("json_trailing_garbage", b'{} {}', b"", None, ["not valid JSON"], True),
    ("not_brace_array", b'[{"a": 1}]', b"", None, ["does not start with '{'"], True),
    ("not_brace_string", b'"{}"', b"", None, ["does not start with '{'"], True),
    ("not_brace_leading_space", b' {}', b"", None, ["does not start with '{'"], False),
    ("entry_not_object", {"a": [1, 2]}, b"", None, ["entry for tensor 'a' is not an object"], True),
    ("metadata_int_value", {"__metadata__": {"k": 1}, **good()}, b"\0" * 4, None,
     ["__metadata__ must map strings to strings"], True),
    ("metadata_nested", {"__metadata__": {"k": {"x": "y"}}, **good()}, b"\0" * 4, None,
     ["__metadata__ must map strings to strings"], True),
    ("metadata_list", {"__metadata__": [], **good()}, b"\0" * 4, None,
     ["__metadata__ must map strings to strings"], True),
    ("metadata_string", {"__metadata__": "", **good()}, b"\0" * 4, None,
     ["__metadata__ must map strings to strings"], True),
    ("duplicate_name",
     b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
     b'"w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}', b"\0\0", None, ["duplicate key 'w'"], True),
    ("duplicate_field", b'{"w": {"dtype": "U8", "dtype": "F32", "shape": [1], "data_offsets": [0, 1]}}', b"\0",
     None, ["duplicate key 'dtype'"], True),
    ("unknown_dtype", {"a": entry("F7", [1], 0, 1)}, b"\0", None, ["tensor 'a'", "unknown dtype 'F7'"], True),
    ("missing_dtype", {"a": {"shape": [1], "data_offsets": [0, 1]}}, b"\0", None, ["unknown dtype None"], True),
    ("negative_dim", {"a": entry("U8", [-1], 0, 1)}, b"\0", None, ["tensor 'a'", "invalid shape [-1]"], True),
    ("float_dim", {"a": entry("U8", [2.0], 0, 2)}, b"\0\0", None, ["invalid shape [2.0]"], True),
    ("bool_dim", {"a": entry("U8", [True], 0, 1)}, b"\0", None, ["invalid shape [True]"], True),
    ("string_dim", {"a": entry("U8", ["1"], 0, 1)}, b"\0", None, ["invalid shape ['1']"], True),
    ("shape_not_list", {"a": {"dtype": "U8", "shape": 1, "data_offsets": [0, 1]}}, b"\0", None,
     ["invalid shape 1"], True),
    ("offsets_one", {"a": {"dtype": "U8", "shape": [1], "data_offsets": [1]}}, b"\0", None,
     ["invalid data_offsets [1]"], True),
    ("offsets_three", {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 2]}}, b"\0", None,
     ["invalid data_offsets [0, 1, 2]"], True),
    ("offsets_reversed", {"a": {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}}, b"\0" * 4, None,
     ["invalid data_offsets [4, 0]"], True),
    ("offsets_negative", {"a": {"dtype": "U8", "shape": [1], "data_offsets": [-1, 0]}}, b"\0", None,
     ["invalid data_offsets [-1, 0]"], True),
    ("overlap", {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, b"\0" * 12, None,
     ["tensor 'b' at offsets [4, 12] overlaps another tensor"], True),
    ("same_offsets", {"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 0, 4)}, b"\0" * 4, None,
     ["overlaps another tensor"], True),
    ("gap", {"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, b"\0" * 12, None,
     ["tensor 'b' at offsets [8, 12] leaves a gap before it"], True),
    ("gap_at_start", {"a": entry("F32", [1], 4, 8)}, b"\0" * 8, None, ["tensor 'a'", "gap"], True),
    ("size_mismatch", {"a": entry("F32", [3], 0, 8)}, b"\0" * 8, None,
     ["tensor 'a' of dtype F32 and shape [3] needs 12 bytes but its data_offsets span 8"], True),
    ("size_mismatch_bf16", {"a": entry("BF16", [2, 2], 0, 4)}, b"\0" * 4, None, ["needs 8 bytes", "span 4"], True),
    ("shape_overflows_u64", {"a": entry("U8", [2**32, 2**32], 0, 0)}, b"", None,
     ["tensor 'a' with shape", "overflows 64-bit"], True),
    ("shape_overflows_with_itemsize", {"a": entry("F32", [2**62], 0, 0)}, b"", None, ["overflows 64-bit"], True),
    ("shape_overflows_before_zero", {"a": entry("U8", [2**40, 2**40, 0], 0, 0)}, b"", None,
     ["overflows 64-bit"], True),
    ("dim_too_big_for_u64", {"a": entry("U8", [0, 2**64], 0, 0)}, b"", None, ["overflows 64-bit"], True),
    # zero elements, but numpy cannot hold such a shape: refused cleanly instead of crashing later
    ("dim_too_big_for_numpy", {"a": entry("U8", [0, 2**63], 0, 0)}, b"", None, ["overflows 64-bit"], False),
    ("trailing_bytes", {"a": entry("F32", [1], 0, 4)}, b"\0" * 6, None, ["2 trailing bytes after the last tensor"],
     True),
    ("trailing_bytes_no_tensors", {}, b"\0", None, ["1 trailing bytes"], True),
    ("truncated_data", {"a": entry("F32", [4], 0, 16)}, b"\0" * 10, None,
     ["tensors need 16 data bytes but the file holds 10", "truncated"], True),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_header_is_a_format_error(tmp_path, case):
    name, header, data, length, fragments, ref_rejects = case
    path = build(tmp_path / f"{name}.safetensors", header, data, length)
    with pytest.raises(FormatError) as info:
        SafetensorsFile(path)
    msg = str(info.value)
    assert str(path) in msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    # the header-only readers refuse it the same way
    with pytest.raises(FormatError, match="^" + str(path).replace(".", r"\.")):
        read_header(path)
    with pytest.raises(FormatError):
        Checkpoint(path)
    if ref_rejects:  # at least as strict as the reference reader
        assert reference_rejects(path)


def test_file_shorter_than_eight_bytes(tmp_path):
    for size in (0, 1, 7):
        path = tmp_path / f"short{size}.safetensors"
        path.write_bytes(b"\x02" * size)
        with pytest.raises(FormatError, match=f"file is {size} bytes, too small for a safetensors header") as info:
            SafetensorsFile(path)
        assert str(path) in str(info.value)
        assert reference_rejects(path)


def test_one_kilobyte_file_declaring_a_hundred_gigabyte_tensor(tmp_path):
    n = 100 * 10**9
    header = json.dumps({"big": entry("F32", [n // 4], 0, n)}).encode()
    header += b" " * ((8 - len(header) % 8) % 8)
    path = build(tmp_path / "liar.safetensors", header, b"\x01" * (1024 - 8 - len(header)))
    assert path.stat().st_size == 1024
    with pytest.raises(FormatError) as info:
        SafetensorsFile(path)
    msg = str(info.value)
    assert str(path) in msg and f"need {n} data bytes" in msg and "truncated" in msg
    assert reference_rejects(path)


def test_not_a_file_is_a_format_error(tmp_path):
    with pytest.raises(FormatError, match="cannot read"):
        SafetensorsFile(tmp_path / "missing.safetensors")
    with pytest.raises(FormatError, match="cannot read"):
        read_header(tmp_path)


# ---------------------------------------------------------------- release


def test_release_does_not_break_later_reads(tmp_path):
    rng = np.random.default_rng(6)
    a = rng.standard_normal((512, 300)).astype(np.float32)  # spans many pages
    b = rng.standard_normal(1001).astype(np.float32)
    path = tmp_path / "r.safetensors"
    safetensors.numpy.save_file({"a": a, "b": b}, str(path))
    with SafetensorsFile(path) as f:
        first = f.raw("a")
        np.testing.assert_array_equal(first, a)
        f.release("a")
        np.testing.assert_array_equal(f.raw("a"), a)
        np.testing.assert_array_equal(first, a)  # a view taken before the release reads the same
        np.testing.assert_array_equal(f.raw("b"), b)  # a neighbour sharing a page is untouched
        f.release()
        np.testing.assert_array_equal(f.raw("b"), b)
        np.testing.assert_array_equal(f.raw("a"), a)
        f.release("b")
        f.release("b")
        np.testing.assert_array_equal(f.raw("b"), b)


# ---------------------------------------------------------------- checkpoints


def write_sharded(folder: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    shards = {
        "model-00001-of-00003.safetensors": {"embed.weight": rng.standard_normal((8, 4)).astype(np.float32),
                                             "layers.0.q.weight": rng.standard_normal((4, 4)).astype(np.float32)},
        "model-00002-of-00003.safetensors": {"layers.0.k.weight": rng.standard_normal((2, 4)).astype(np.float16),
                                             "layers.1.q.weight": rng.standard_normal((4, 4)).astype(np.float32)},
        "model-00003-of-00003.safetensors": {"lm_head.weight": rng.standard_normal((8, 4)).astype(np.float32)},
    }
    weight_map, total, everything = {}, 0, {}
    for shard, tensors in shards.items():
        safetensors.numpy.save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        for name, arr in tensors.items():
            weight_map[name] = shard
            total += arr.nbytes
            everything[name] = (shard, arr)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return everything


def test_sharded_checkpoint_lists_every_key_with_its_shard(tmp_path):
    everything = write_sharded(tmp_path)
    ck = Checkpoint(tmp_path)
    assert ck.sharded and ck.index_name == "model.safetensors.index.json"
    assert sorted(ck.keys()) == sorted(everything)
    assert ck.shard_of == {k: s for k, (s, _) in everything.items()}
    assert ck.shards == sorted({s for s, _ in everything.values()})
    assert ck.total_bytes() == sum(a.nbytes for _, a in everything.values())
    assert ck.index_metadata == {"total_size": ck.total_bytes()}
    assert {p.name for p in ck.files()} == set(ck.shards) | {"model.safetensors.index.json"}
    for name, (shard, arr) in everything.items():
        assert name in ck
        info = ck.info(name)
        assert info.shape == arr.shape and info.dtype == {np.float32: "F32", np.float16: "F16"}[arr.dtype.type]
        with ck.open(shard) as f:
            np.testing.assert_array_equal(f.raw(name), arr)
    assert ck.metadata[ck.shards[0]] == {"format": "pt"}


def test_index_naming_a_missing_shard(tmp_path):
    write_sharded(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["extra.weight"] = "model-00004-of-00003.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match=r"shard 'model-00004-of-00003.safetensors' is not a file") as info:
        Checkpoint(tmp_path)
    assert "model.safetensors.index.json" in str(info.value)


def test_index_naming_a_key_not_in_its_shard(tmp_path):
    write_sharded(tmp_path)
    path = tmp_path / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"]["embed.weight"] = "model-00002-of-00003.safetensors"  # it is in shard 1
    path.write_text(json.dumps(index))
    with pytest.raises(FormatError, match=r"tensor 'embed.weight' is listed in model-00002-of-00003.safetensors "
                                          r"but is not there"):
        Checkpoint(tmp_path)
    index = json.loads(path.read_text())
    index["weight_map"]["embed.weight"] = "model-00001-of-00003.safetensors"
    index["weight_map"]["ghost.weight"] = "model-00003-of-00003.safetensors"  # in no shard at all
    path.write_text(json.dumps(index))
    with pytest.raises(FormatError, match=r"'ghost.weight' is listed in model-00003-of-00003.safetensors"):
        Checkpoint(tmp_path)


def test_index_with_a_malformed_shard_names_the_shard(tmp_path):
    write_sharded(tmp_path)
    shard = tmp_path / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(FormatError, match="model-00002-of-00003.safetensors.*truncated"):
        Checkpoint(tmp_path)


def test_pickle_checkpoints_are_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    with pytest.raises(FormatError) as info:
        Checkpoint(folder)
    msg = str(info.value)
    assert "pytorch_model.bin" in msg and "pickle" in msg and "safetensors" in msg
    with pytest.raises(FormatError) as info:
        Checkpoint(folder / "pytorch_model.bin")
    msg = str(info.value)
    assert "pytorch_model.bin" in msg and "pickle" in msg and "safetensors" in msg


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(FormatError, match="no .safetensors checkpoint found") as info:
        Checkpoint(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(FormatError, match="no such file or directory"):
        Checkpoint(tmp_path / "nope")


def test_single_file_and_folder_checkpoints(tmp_path):
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    safetensors.numpy.save_file({"w": arr}, str(tmp_path / "model.safetensors"))
    for ck in (Checkpoint(tmp_path), Checkpoint(tmp_path / "model.safetensors")):
        assert not ck.sharded and ck.keys() == ["w"] and ck.shard_of == {"w": "model.safetensors"}
        assert ck.info("w").shape == (2, 3)


# ---------------------------------------------------------------- atomic outputs


def leftovers(folder: Path, out_name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{out_name}."))


def test_atomic_dir_appears_whole_on_success(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        assert tmp.is_dir() and tmp.parent == tmp_path and tmp != out
        (tmp / "a.txt").write_text("one")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("two")
        assert not out.exists()  # nothing visible until the body completes
    assert (out / "a.txt").read_text() == "one" and (out / "sub" / "b.txt").read_text() == "two"
    assert leftovers(tmp_path, "out") == []
    # replacing a previous output
    with atomic_dir(out) as tmp:
        (tmp / "c.txt").write_text("three")
        assert (out / "a.txt").read_text() == "one"  # the old one is intact meanwhile
    assert sorted(p.name for p in out.iterdir()) == ["c.txt", "lorafuse_manifest.json"]  # lorafuse's mark
    assert leftovers(tmp_path, "out") == []


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    out = tmp_path / "deep" / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(out) as tmp:
            (tmp / "partial.safetensors").write_bytes(b"x" * 100)
            raise RuntimeError("boom")
    assert not out.exists()
    assert not out.parent.exists()  # the folder the run made for its output went with the failure
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_failure_keeps_previous_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out, overwrite=True) as tmp:  # a folder lorafuse did not write: replaced on request
            (tmp / "old.txt").write_text("half-written")
            (tmp / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert (out / "old.txt").read_text() == "previous"
    assert leftovers(tmp_path, "out") == []


def test_atomic_dir_refuses_an_input_as_output(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    weights = model / "model.safetensors"
    safetensors.numpy.save_file({"w": np.ones(2, np.float32)}, str(weights))
    before = weights.read_bytes()
    cases = [
        (model, [weights]),  # the folder that holds an input
        (tmp_path, [weights]),  # a grandparent of an input
        (weights, [weights]),  # the input itself
        (model, [model]),  # an input folder
        (tmp_path / "model" / ".." / "model", [weights]),  # the same folder spelled differently
    ]
    for out, inputs in cases:
        with pytest.raises(lorafuse.OutputError, match="would overwrite the input"):
            with atomic_dir(out, inputs):
                raise AssertionError("the body must not run")
    with pytest.raises(lorafuse.OutputError, match="would overwrite the input"):
        with atomic_file(weights, [weights]):
            raise AssertionError("the body must not run")
    assert weights.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in model.iterdir()) == ["model.safetensors"]
    # a sibling folder is fine
    with atomic_dir(tmp_path / "merged", [weights]) as tmp:
        (tmp / "x").write_text("ok")
    assert (tmp_path / "merged" / "x").read_text() == "ok"


def test_atomic_file_success_and_failure(tmp_path):
    out = tmp_path / "a.safetensors"
    with atomic_file(out) as tmp:  # marked as lorafuse's: a later run may replace it
        save_file({"w": ("F32", np.arange(3, dtype=np.float32))}, tmp, {"lorafuse_version": lorafuse.__version__})
        assert not out.exists()
    with safe_open(str(out), framework="numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("w"), [0, 1, 2])
    before = out.read_bytes()
    with pytest.raises(OSError):
        with atomic_file(out) as tmp:
            tmp.write_bytes(b"garbage")
            raise OSError("disk full")
    assert out.read_bytes() == before
    assert leftovers(tmp_path, "a.safetensors") == []
    assert os.listdir(tmp_path) == ["a.safetensors"]
