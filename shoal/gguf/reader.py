"""Opens a GGUF file (llama.cpp's format, one file or a split set `name-00001-of-0000N.gguf`) as untrusted
input: walks each header once, with bounds checks on every count, length and offset, decoding the metadata
and the tensor table on the way, and maps the tensor data with numpy.

The header is parsed here and only here (the `gguf` package's GGUFReader is not used: it trusts the file —
an array count past the end makes it loop for ever — and parsing the header a second time cost as long as
the walk itself). Each damaged file ends in a WeightError naming what is wrong, before any tensor is read.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shoal.errors import ConfigError, WeightError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 1024  # tensor and key names; llama.cpp itself caps tensor names at 64
MAX_STRING_BYTES = 64 << 20  # one metadata string (chat templates run to tens of kB)
MAX_ARRAY_DEPTH = 3
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types: id -> struct format (strings and arrays have none)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_SCALAR_SIZES = {t: struct.calcsize(f) for t, f in _SCALARS.items()}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_LENGTH = struct.Struct("<Q")  # a string's byte count
SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def _ggml_types() -> dict[int, tuple[str, int, int]]:
    """ggml type id -> (name, elements per block, bytes per block), from the gguf package."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return {int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}


# The ggml types shoal reads: every type llama.cpp's quantize presets Q2_K ... Q8_0 (and IQ4_NL / IQ4_XS)
# write. Float types are read as they are; Q4_0, Q4_1 and Q4_K go straight into int4 group-32 layers;
# the rest are dequantized (shoal/gguf/dequant.py).
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
)  # fmt: skip
# What to tell the user whose file holds another type (IQ1 / IQ2 / IQ3 / TQ / MXFP4 ...).
REQUANTIZE_ADVICE = (
    "Re-quantize the model to one of them with llama.cpp's llama-quantize (any preset from Q2_K to Q8_0, "
    "e.g. `llama-quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M`), or load its Hugging Face checkpoint "
    "folder with --quant int4 / int8"
)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header declares it, after checking; `shape` is row-major (ggml's dims reversed)."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in its file
    n_bytes: int
    part: int = 0  # which file of a split set holds it (0: the first, or the only one)


class _Walker:
    """Reads little-endian values from a byte buffer, refusing any read past its end."""

    def __init__(self, buf, size: int, path: Path) -> None:
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, what: str) -> WeightError:
        return WeightError(f"{self.path} is not a valid GGUF file: {what}; the file is damaged or truncated")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} at byte {self.pos} runs past the end of the file ({self.size} bytes)")

    def unpack(self, fmt: str, what: str) -> int:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str, limit: int = MAX_STRING_BYTES) -> bytes:
        length = self.unpack("Q", f"the length of {what}")
        if length > limit:
            raise self.fail(f"{what} claims {length} bytes (at most {limit} allowed)")
        self.need(length, what)
        data = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        return data

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        """One metadata value: a number, bytes (a string, decoded when asked for), a numpy array (numbers)
        or a list (strings, arrays)."""
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise self.fail(f"{what} has unknown value type {vtype}")
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"{what} nests arrays deeper than {MAX_ARRAY_DEPTH}")
        itype = self.unpack("I", f"the element type of {what}")
        count = self.unpack("Q", f"the length of {what}")
        if itype in _SCALARS:
            total = count * _SCALAR_SIZES[itype]
            self.need(total, f"{what} ({count} elements)")
            array = np.frombuffer(self.buf, dtype=_NUMPY[itype], count=count, offset=self.pos).copy()
            self.pos += total
            return array
        if itype not in (_STRING, _ARRAY):
            raise self.fail(f"{what} has unknown element type {itype}")
        # each string or array element takes at least 8 bytes: a bound on the loop below
        if count > (self.size - self.pos) // 8:
            raise self.fail(f"{what} claims {count} elements, more than the file can hold")
        if itype == _STRING:
            return self.strings(count, what)
        return [self.value(itype, what, depth + 1) for _ in range(count)]

    def strings(self, count: int, what: str) -> list[bytes]:
        """`count` strings in a row (a vocabulary: 10^5 of them), with string()'s checks in one tight loop."""
        buf, size, pos, out = self.buf, self.size, self.pos, []
        length_at = _LENGTH.unpack_from
        for index in range(count):
            if pos + 8 > size:
                self.pos = pos
                raise self.fail(f"the length of {what}[{index}] at byte {pos} runs past the end of the file ({size} bytes)")
            (length,) = length_at(buf, pos)
            pos += 8
            if length > MAX_STRING_BYTES or pos + length > size:
                raise self.fail(f"{what}[{index}] claims {length} bytes, past the end of the file or over {MAX_STRING_BYTES}")
            out.append(bytes(buf[pos : pos + length]))
            pos += length
        self.pos = pos
        return out


@dataclass
class _Header:
    metadata: dict[str, Any]  # key -> value as _Walker.value returns it
    tensors: list[TensorInfo]


def _walk_header(buf, size: int, path: Path, part: int = 0) -> _Header:
    """Check and decode the whole header: its metadata, and its tensors (type support unchecked)."""
    w = _Walker(buf, size, path)
    w.need(4, "the magic number")
    magic = bytes(buf[0:4])
    if magic != GGUF_MAGIC:
        raise WeightError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    w.pos = 4
    version = w.unpack("I", "the version")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0:
            raise WeightError(f"{path} is a big-endian GGUF file; shoal reads little-endian GGUF files only")
        raise WeightError(f"{path} is GGUF version {version}; shoal reads versions 2 and 3")
    tensor_count = w.unpack("Q", "the tensor count")
    kv_count = w.unpack("Q", "the metadata count")
    # a metadata pair takes at least 13 bytes, a tensor description at least 29
    if kv_count > size // 13 or tensor_count > size // 29:
        raise w.fail(f"it claims {kv_count} metadata entries and {tensor_count} tensors, more than fit in the file")
    metadata: dict[str, Any] = {}
    for index in range(kv_count):
        key = w.string(f"the key of metadata entry {index}", MAX_NAME_BYTES).decode("utf-8", "replace")
        vtype = w.unpack("I", f"the type of metadata {key!r}")
        if key == "general.alignment" and vtype != _UINT32:
            raise w.fail("general.alignment is not a uint32")
        metadata[key] = w.value(vtype, f"metadata {key!r}")
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if alignment == 0 or alignment & (alignment - 1):
        raise w.fail(f"general.alignment is {alignment}, not a power of two")
    types = _ggml_types()
    raw: list[tuple[str, tuple[int, ...], int, int]] = []
    for index in range(tensor_count):
        name = w.string(f"the name of tensor {index}", MAX_NAME_BYTES).decode("utf-8", "replace")
        n_dims = w.unpack("I", f"the rank of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise w.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = tuple(w.unpack("Q", f"the shape of tensor {name!r}") for _ in range(n_dims))
        type_id = w.unpack("I", f"the type of tensor {name!r}")
        offset = w.unpack("Q", f"the data offset of tensor {name!r}")
        raw.append((name, dims, type_id, offset))
    data_start = w.pos + (-w.pos) % alignment
    unknown = [(name, type_id) for name, _, type_id, _ in raw if type_id not in types]
    if unknown:
        raise WeightError(
            f"{path}: tensor {unknown[0][0]!r} has unknown ggml type id {unknown[0][1]}, which is newer than "
            f"shoal's gguf package knows; shoal reads GGUF tensors of types {', '.join(SUPPORTED_TYPES)}. "
            f"Upgrade the gguf package (pip install -U gguf) if the file is new. {REQUANTIZE_ADVICE}"
        )
    unsupported = sorted({(types[t][0], name) for name, _, t, _ in raw if types[t][0] not in SUPPORTED_TYPES})
    if unsupported:
        kinds = sorted({kind for kind, _ in unsupported})
        raise WeightError(
            f"{path} holds tensors of type {', '.join(kinds)} (e.g. {unsupported[0][1]}); "
            f"shoal reads GGUF tensors of types {', '.join(SUPPORTED_TYPES)} only. {REQUANTIZE_ADVICE}"
        )
    tensors: list[TensorInfo] = []
    seen: set[str] = set()
    for name, dims, type_id, offset in raw:
        if name in seen:
            raise w.fail(f"tensor {name!r} appears twice")
        seen.add(name)
        type_name, block, block_bytes = types[type_id]
        if any(d <= 0 for d in dims):
            raise w.fail(f"tensor {name!r} has shape {list(dims)} with a zero dimension")
        if dims[0] % block:
            raise w.fail(
                f"tensor {name!r} of type {type_name} has rows of {dims[0]} values, not a whole number of "
                f"{type_name}'s {block}-value blocks"
            )
        n_elements = 1
        for d in dims:
            n_elements *= d
        n_bytes = n_elements // block * block_bytes
        if offset % alignment:
            raise w.fail(f"tensor {name!r} starts at offset {offset}, not aligned to {alignment} bytes")
        start = data_start + offset
        if n_bytes > size or start + n_bytes > size:
            raise w.fail(
                f"tensor {name!r} ({type_name}, shape {list(reversed(dims))}) needs bytes {start}..{start + n_bytes} "
                f"but the file has {size}"
            )
        tensors.append(TensorInfo(name, type_name, tuple(reversed(dims)), start, n_bytes, part))
    return _Header(metadata, tensors)


def _open(path: Path, part: int = 0) -> tuple[np.memmap, _Header]:
    if not path.is_file():
        raise WeightError(f"no GGUF file at {path}")
    size = path.stat().st_size
    if size == 0:
        raise WeightError(f"{path} is empty; it is not a GGUF file")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return data, _walk_header(memoryview(data), size, path, part)


def _as_python(value: Any) -> Any:
    """A walked metadata value as Python: str for strings, lists for arrays."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list):
        return [_as_python(v) for v in value]
    return value


class GGUFFile:
    """A checked GGUF file (or split set): `metadata(key)`, `tensors` (name -> TensorInfo) and `raw(name)`
    (a memory-mapped array). Open it once and hand it around: the config, the weights and the tokenizer
    all read from the same object."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        data, header = _open(self.path)
        self._meta = header.metadata
        self._cache: dict[str, Any] = {}
        self._data = [data]
        self.paths = [self.path]
        infos = header.tensors
        count = self._meta.get("split.count", 1)
        if isinstance(count, int) and count > 1:
            infos = self._open_parts(count, infos)
        self.tensors: dict[str, TensorInfo] = {}
        for info in infos:
            if info.name in self.tensors:
                raise WeightError(f"{self.path}: tensor {info.name!r} appears in two files of the split set")
            self.tensors[info.name] = info

    def _open_parts(self, count: int, first: list[TensorInfo]) -> list[TensorInfo]:
        """A split set (llama.cpp's gguf-split, or convert_hf_to_gguf --split-max-size): the first file holds
        the metadata, every file its share of the tensors."""
        match = SPLIT_NAME.match(self.path.name)
        if match is None or int(match["count"]) != count:
            raise WeightError(
                f"{self.path} is part of a GGUF file split in {count} (split.count) but is not named "
                f"NAME-0000K-of-{count:05d}.gguf; keep the names llama.cpp gave the parts"
            )
        if self._meta.get("split.no", 0) != 0 or int(match["no"]) != 1:
            raise WeightError(
                f"{self.path} is part {int(match['no'])} of a split GGUF file; pass the first part, "
                f"{match['prefix']}-00001-of-{count:05d}.gguf"
            )
        infos = list(first)
        for no in range(1, count):
            path = self.path.with_name(f"{match['prefix']}-{no + 1:05d}-of-{count:05d}.gguf")
            if not path.is_file():
                raise WeightError(f"{self.path} is split in {count} files but {path.name} is not beside it; copy all of them")
            data, header = _open(path, part=no)
            if header.metadata.get("split.no") != no or header.metadata.get("split.count") != count:
                raise WeightError(f"{path} is not part {no + 1} of {count} of {self.path.name}; the split set is mixed up")
            self._data.append(data)
            self.paths.append(path)
            infos.extend(header.tensors)
        expected = self._meta.get("split.tensors.count")
        if isinstance(expected, int) and expected != len(infos):
            raise WeightError(
                f"{self.path}: the split set should hold {expected} tensors but its {count} files hold {len(infos)}; "
                "a part is from another model or was cut short"
            )
        return infos

    # ---- metadata ------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self._meta

    def metadata(self, key: str, default: Any = None) -> Any:
        """A metadata value as Python (int, float, bool, str or list), or `default` when absent."""
        if key in self._cache:
            return self._cache[key]
        if key not in self._meta:
            return default
        try:
            value = _as_python(self._meta[key])
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{self.path}: cannot read metadata {key!r} ({exc}); the file is damaged") from None
        self._cache[key] = value
        return value

    @property
    def architecture(self) -> str:
        arch = self.metadata("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise ConfigError(f"{self.path} has no general.architecture, so shoal cannot tell which model it is")
        return arch

    # ---- tensors -------------------------------------------------------------------------------
    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes, memory-mapped, as the gguf package lays them out: F32 / F16 typed in the
        tensor's shape, every other type (BF16 included) as uint8 rows [..., bytes per row]."""
        info = self.tensors[name]
        data = self._data[info.part][info.offset : info.offset + info.n_bytes]
        if info.type_name == "F32":
            return data.view(np.float32).reshape(info.shape)
        if info.type_name == "F16":
            return data.view(np.float16).reshape(info.shape)
        rows = 1
        for d in info.shape[:-1]:
            rows *= d
        return data.reshape(*info.shape[:-1], info.n_bytes // rows)
