"""Opens a GGUF file (llama.cpp's single-file format) as untrusted input: walks its header once with
bounds checks on every count, length and offset, then hands it to the `gguf` package's memory-mapped
GGUFReader and exposes its metadata and tensors.

The walk exists because GGUFReader trusts the file: an array count past the end of the file makes it
loop for ever, and a tensor past the end fails deep inside numpy. Here each such file ends in a
WeightError naming what is wrong, before any tensor is read.
"""

from __future__ import annotations

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

# GGUF metadata value types: id -> fixed size in bytes (strings and arrays have none)
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


def _ggml_types() -> dict[int, tuple[str, int, int]]:
    """ggml type id -> (name, elements per block, bytes per block), from the gguf package."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return {int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}


# The ggml types shoal reads: float types as they are, Q8_0 and Q4_0 by their 32-element blocks.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header declares it, after checking; `shape` is row-major (ggml's dims reversed)."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    n_bytes: int


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

    def skip_value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype in _SCALAR_SIZES:
            self.need(_SCALAR_SIZES[vtype], what)
            self.pos += _SCALAR_SIZES[vtype]
        elif vtype == _STRING:
            self.string(what)
        elif vtype == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise self.fail(f"{what} nests arrays deeper than {MAX_ARRAY_DEPTH}")
            itype = self.unpack("I", f"the element type of {what}")
            count = self.unpack("Q", f"the length of {what}")
            if itype in _SCALAR_SIZES:
                total = count * _SCALAR_SIZES[itype]
                self.need(total, f"{what} ({count} elements)")
                self.pos += total
                return
            if itype not in (_STRING, _ARRAY):
                raise self.fail(f"{what} has unknown element type {itype}")
            # each string or array element takes at least 8 bytes: a bound on the loop below
            if count > (self.size - self.pos) // 8:
                raise self.fail(f"{what} claims {count} elements, more than the file can hold")
            for _ in range(count):
                self.skip_value(itype, what, depth + 1)
        else:
            raise self.fail(f"{what} has unknown value type {vtype}")


def _walk_header(buf, size: int, path: Path) -> tuple[list[TensorInfo], int]:
    """Check the whole header; return the tensors (unchecked type support) and the data section start."""
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
    alignment = DEFAULT_ALIGNMENT
    for index in range(kv_count):
        key_bytes = w.string(f"the key of metadata entry {index}", MAX_NAME_BYTES)
        key = key_bytes.decode("utf-8", "replace")
        vtype = w.unpack("I", f"the type of metadata {key!r}")
        if key == "general.alignment":
            if vtype != _UINT32:
                raise w.fail("general.alignment is not a uint32")
            alignment = w.unpack("I", "general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise w.fail(f"general.alignment is {alignment}, not a power of two")
        else:
            w.skip_value(vtype, f"metadata {key!r}")
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
            f"{path}: tensor {unknown[0][0]!r} has unknown ggml type id {unknown[0][1]}; "
            f"shoal reads GGUF tensors of types {', '.join(SUPPORTED_TYPES)}"
        )
    unsupported = sorted({(types[t][0], name) for name, _, t, _ in raw if types[t][0] not in SUPPORTED_TYPES})
    if unsupported:
        kinds = sorted({kind for kind, _ in unsupported})
        raise WeightError(
            f"{path} holds tensors of type {', '.join(kinds)} (e.g. {unsupported[0][1]}); "
            f"shoal reads GGUF tensors of types {', '.join(SUPPORTED_TYPES)} only. "
            "Re-quantize the model to one of them with llama.cpp's llama-quantize, or convert it from its "
            "Hugging Face checkpoint"
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
            raise w.fail(f"tensor {name!r} of type {type_name} has rows of {dims[0]}, not a multiple of {block}")
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
        tensors.append(TensorInfo(name, type_name, tuple(reversed(dims)), start, n_bytes))
    return tensors, data_start


class GGUFFile:
    """A checked GGUF file: `metadata(key)`, `tensors` (name -> TensorInfo) and `raw(name)` (a memory-mapped array)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightError(f"no GGUF file at {self.path}")
        size = self.path.stat().st_size
        if size == 0:
            raise WeightError(f"{self.path} is empty; it is not a GGUF file")
        data = np.memmap(self.path, dtype=np.uint8, mode="r")
        infos, self.data_start = _walk_header(memoryview(data), size, self.path)
        from gguf import GGUFReader

        try:
            self._reader = GGUFReader(self.path, "r")
        except Exception as exc:  # the walk above should have caught anything; this is a second net
            raise WeightError(f"{self.path} is not a valid GGUF file: {exc}") from None
        self.tensors: dict[str, TensorInfo] = {t.name: t for t in infos}
        self._arrays: dict[str, Any] = {}
        for t in self._reader.tensors:
            info = self.tensors.get(t.name)
            if info is None or info.offset != t.data_offset or info.n_bytes != t.n_bytes:
                raise WeightError(f"{self.path}: the gguf package reads tensor {t.name!r} differently; the file is damaged")
            self._arrays[t.name] = t.data
        self._cache: dict[str, Any] = {}

    # ---- metadata ------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self._reader.fields

    def metadata(self, key: str, default: Any = None) -> Any:
        """A metadata value as Python (int, float, bool, str or list), or `default` when absent."""
        if key in self._cache:
            return self._cache[key]
        field = self._reader.fields.get(key)
        if field is None:
            return default
        try:
            value = field.contents()
        except (UnicodeDecodeError, IndexError, ValueError) as exc:
            raise ConfigError(f"{self.path}: cannot read metadata {key!r} ({exc})") from None
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
        """The tensor's bytes as the gguf package maps them: floats typed, quantized types as uint8 rows."""
        return self._arrays[name]
