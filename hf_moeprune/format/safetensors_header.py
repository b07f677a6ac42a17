"""Reading the JSON header of a safetensors file without loading any tensor.

A safetensors file starts with the header's length as a little-endian u64, then the header (JSON: tensor name ->
dtype, shape, offsets, plus ``__metadata__``), then the tensor data.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, BinaryIO


def header_bytes(f: BinaryIO, limit: int | None = None) -> bytes:
    """The raw header of the open safetensors file ``f`` (read from its start), at most ``limit`` bytes; empty for
    a file shorter than the 8-byte length prefix."""
    head = f.read(8)
    size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
    return f.read(size if limit is None else min(size, limit))


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed header of a safetensors file."""
    with open(path, "rb") as f:
        return json.loads(header_bytes(f))
