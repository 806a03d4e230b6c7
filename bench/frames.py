"""gRPC length-prefixed message frames, for request bodies that h2load posts verbatim."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TypeVar

from google.protobuf.message import Message

M = TypeVar("M", bound=Message)
_PREFIX = struct.Struct(">BI")  # compressed flag, big-endian message length


def encode_frame(message: Message) -> bytes:
    """One uncompressed gRPC frame: flag 0, 4-byte length, serialized message."""
    body = message.SerializeToString()
    return _PREFIX.pack(0, len(body)) + body


def decode_frame(data: bytes, message_type: type[M]) -> M:
    """The message in one uncompressed frame; refuses compressed or truncated frames."""
    if len(data) < _PREFIX.size:
        raise ValueError(f"gRPC frame too short: {len(data)} bytes")
    flag, length = _PREFIX.unpack_from(data)
    if flag != 0:
        raise ValueError("compressed gRPC frames are not supported")
    if len(data) != _PREFIX.size + length:
        raise ValueError(f"gRPC frame says {length} bytes, has {len(data) - _PREFIX.size}")
    return message_type.FromString(data[_PREFIX.size :])


def write_frame(path: Path, message: Message) -> int:
    """Write a frame to path (an h2load -d body); return its size in bytes."""
    frame = encode_frame(message)
    path.write_bytes(frame)
    return len(frame)
