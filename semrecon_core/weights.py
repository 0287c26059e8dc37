"""One check for every weights file semrecon reads (encoders, warm-start checkpoints, embedding banks).

A ``.safetensors`` file is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the tensor bytes. :func:`read_header` reads and checks that header before any
library touches the file: the length field, the JSON, every dtype known (and, where asked, floating point),
every byte range the size its dtype and shape need, the ranges back to back and covering the rest of the file
exactly. :func:`check_tensors` compares the header with the tensors a model expects (names, shapes, dtypes).
A file that is cut short, empty, zero-filled, not safetensors at all, stored in the wrong dtype or shaped for
another model raises :class:`DamagedWeightsError`, a ``ValueError`` naming the file, what is wrong and how to
get a good copy (the command line turns it into one line and exit status 2; the gadget and ``semrecon serve``
into a labelled fallback image). Only the header is read: checking a multi-gigabyte encoder costs nothing.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Bits per element of every dtype safetensors writes.
DTYPE_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
FLOATING = frozenset(("F16", "BF16", "F32", "F64"))
# safetensors caps the JSON header at 100 MB; a larger length field is not a safetensors file.
MAX_HEADER = 100_000_000
# How much of a file is looked at to call it zero-filled.
_ZERO_PROBE = 1 << 16


class DamagedWeightsError(ValueError):
    """A weights file that cannot be used: names the file, what is wrong, and how to get a good copy.

    Attributes:
        path: the file.
        problem: what is wrong (``truncated: ...``, ``empty file``, ``wrong dtype: ...``, ...).
        what: what the file should be (``embedding bank``, ``U-Net checkpoint``, ``encoder weights file``).
        remedy: how to get a good copy (the command that writes it again).
    """

    def __init__(self, path: str | os.PathLike, problem: str, *, what: str = "weights file", remedy: str = "") -> None:
        self.path = Path(path)
        self.problem = problem
        self.what = what
        self.remedy = remedy
        text = f"{path}: not a readable {what}: {problem}"
        super().__init__(f"{text}; {remedy}" if remedy else text)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: its dtype code (``F32``, ``I64``, ...) and shape."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SafetensorsHeader:
    """The checked header of a safetensors file: tensors by name and the ``__metadata__`` strings."""

    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)


def read_header(
    path: str | os.PathLike,
    *,
    what: str = "weights file",
    remedy: str = "",
    dtypes: Iterable[str] | None = FLOATING,
    error: type[DamagedWeightsError] = DamagedWeightsError,
) -> SafetensorsHeader:
    """The header of the safetensors file ``path``, checked against the file before anything loads it.

    Args:
        path: the file.
        what: what the file should be, for the error message (:class:`DamagedWeightsError`).
        remedy: how to get a good copy, for the error message.
        dtypes: the dtype codes every tensor must have (default floating point); ``None``: any known dtype
            (then :func:`check_tensors` compares them with the model's).
        error: the class raised (a subclass of :class:`DamagedWeightsError`, e.g. a bank's).

    Raises:
        FileNotFoundError: no such file.
        DamagedWeightsError: (``error``) the file is empty, truncated, zero-filled, not safetensors, or holds a
            tensor of another dtype than ``dtypes``.
    """
    path = Path(path)

    def damaged(problem: str) -> DamagedWeightsError:
        return error(path, problem, what=what, remedy=remedy)

    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found" + (f"; {remedy}" if remedy else ""))
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(min(size, _ZERO_PROBE))
        if size == 0:
            raise damaged("empty file (0 bytes)")
        if not head.strip(b"\0"):
            raise damaged(f"zero-filled (its first {len(head)} of {size} bytes are all zero)")
        if size < 8:
            raise damaged(f"truncated: {size} bytes, fewer than the 8-byte header length")
        (length,) = struct.unpack("<Q", head[:8])
        looks_like_json = head[8:9] == b"{"
        if not looks_like_json or length > MAX_HEADER:
            raise damaged(
                "not a safetensors file (it does not begin with an 8-byte header length and a JSON header; "
                f"the first bytes are {head[:16]!r})"
            )
        if length > size - 8:
            raise damaged(f"truncated: the header claims {length} bytes but only {size - 8} follow the length field")
        handle.seek(8)
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise damaged(f"not a safetensors file (its header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise damaged(f"not a safetensors file (its header is a JSON {type(header).__name__}, not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise damaged("malformed header: '__metadata__' is not a map of strings")
    allowed = None if dtypes is None else frozenset(dtypes)
    tensors: dict[str, TensorEntry] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        try:
            dtype = str(entry["dtype"])
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise damaged(f"malformed header: the entry of tensor {name!r} is {entry!r}") from None
        if dtype not in DTYPE_BITS:
            raise damaged(f"malformed header: tensor {name!r} has the unknown dtype {dtype!r}")
        if allowed is not None and dtype not in allowed:
            raise damaged(
                f"wrong dtype: tensor {name!r} is stored as {dtype}, expected one of {', '.join(sorted(allowed))}"
            )
        count = 1
        for n in shape:
            count *= n
        if min(shape, default=0) < 0 or begin < 0 or end - begin != (count * DTYPE_BITS[dtype] + 7) // 8:
            raise damaged(
                f"malformed header: tensor {name!r} ({dtype}, shape {shape}) is given bytes {begin}–{end}, "
                "which do not hold it"
            )
        tensors[name] = TensorEntry(dtype, shape)
        ranges.append((begin, end, name))
    stored = size - 8 - length
    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            raise damaged(f"malformed header: tensor {name!r} starts at byte {begin}, expected {position}")
        position = end
    if position > stored:
        raise damaged(
            f"truncated: the header describes {position} bytes of tensor data, the file holds {stored} "
            f"({position - stored} bytes missing)"
        )
    if position < stored:
        raise damaged(f"{stored - position} bytes follow the last tensor (the file was overwritten or appended to)")
    return SafetensorsHeader(path, tensors, dict(metadata))


def read_headers(
    files: Iterable[Path], *, what: str, remedy: str, dtypes: Iterable[str] | None = FLOATING
) -> dict[str, tuple[Path, TensorEntry]]:
    """Every tensor of several safetensors files (a sharded checkpoint): name → (file, entry); each file checked."""
    found: dict[str, tuple[Path, TensorEntry]] = {}
    for file in files:
        header = read_header(file, what=what, remedy=remedy, dtypes=dtypes)
        found.update((name, (file, entry)) for name, entry in header.tensors.items())
    return found


def safetensors_dtype(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (``torch.float32`` → ``F32``)."""
    import torch

    codes = {
        torch.bool: "BOOL",
        torch.uint8: "U8",
        torch.int8: "I8",
        torch.int16: "I16",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.int32: "I32",
        torch.float32: "F32",
        torch.float64: "F64",
        torch.int64: "I64",
        torch.complex64: "C64",
    }
    return codes.get(dtype, str(dtype))


def check_tensors(
    found: Mapping[str, tuple[Path, TensorEntry]],
    expected: Mapping[str, Any],
    *,
    path: str | os.PathLike,
    what: str,
    remedy: str,
    prefix: str = "",
    strict: bool = True,
    error: type[DamagedWeightsError] = DamagedWeightsError,
) -> None:
    """Compare stored tensors with those a model expects: every one present, with its shape and dtype.

    Args:
        found: stored tensors (:func:`read_headers`; a single file's ``{name: (path, entry)}``).
        expected: the model's tensors by name without ``prefix`` (``model.state_dict()``: anything with
            ``.shape`` and ``.dtype``); a floating-point tensor accepts any floating dtype, others their own.
        path: the file or directory the error names.
        what: what the file should be, for the error message.
        remedy: how to get a good copy, for the error message.
        prefix: the stored names' prefix (``model.vision_model.`` for Janus's vision tower).
        strict: stored tensors under ``prefix`` that the model does not have are an error too.
        error: the class raised (a subclass of :class:`DamagedWeightsError`).

    Raises:
        DamagedWeightsError: (``error``) naming the first tensor that is missing, of another shape (expected
            and found) or of another dtype, and how many others are.
    """
    missing = [name for name in expected if prefix + name not in found]
    if missing:
        raise error(
            path,
            f"tensor {prefix + missing[0]!r} is missing ({len(missing)} of the {len(expected)} tensors the model "
            "needs are absent)",
            what=what,
            remedy=remedy,
        )
    wrong: list[str] = []
    for name, tensor in expected.items():
        file, entry = found[prefix + name]
        where = "" if file == Path(path) else f"{file.name}: "  # the shard, when ``path`` is a directory
        shape = tuple(int(n) for n in tensor.shape)
        code = safetensors_dtype(tensor.dtype)
        if entry.shape != shape:
            wrong.append(f"{where}tensor {prefix + name!r} has shape {entry.shape}, the model expects {shape}")
        elif (code in FLOATING) != (entry.dtype in FLOATING) or (code not in FLOATING and entry.dtype != code):
            wrong.append(f"{where}tensor {prefix + name!r} is stored as {entry.dtype}, the model expects {code}")
    if wrong:
        kind = "shape mismatch" if "has shape" in wrong[0] else "wrong dtype"
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise error(path, f"{kind}: {wrong[0]}{more}", what=what, remedy=remedy)
    if strict:
        extra = sorted(name for name in found if name.startswith(prefix) and name[len(prefix) :] not in expected)
        if extra:
            raise error(
                path,
                f"tensor {extra[0]!r} has no place in the model ({len(extra)} unexpected tensors)",
                what=what,
                remedy=remedy,
            )


__all__ = [
    "FLOATING",
    "DamagedWeightsError",
    "SafetensorsHeader",
    "TensorEntry",
    "check_tensors",
    "read_header",
    "read_headers",
    "safetensors_dtype",
]
