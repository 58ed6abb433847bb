"""Sample grids written as PNG files, with a small PNG encoder (zlib + CRC chunks; no imaging library).

PNG layout (ISO/IEC 15948): the 8-byte signature, an IHDR chunk (width, height, bit depth 8, colour
type 0 = grey or 2 = RGB), one IDAT chunk holding the zlib-compressed rows (each row prefixed by
filter byte 0), and IEND.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from pathlib import Path

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] -> uint8 pixels (what a dataset stores)."""
    return ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def grid(images: torch.Tensor, columns: int, padding: int = 2) -> torch.Tensor:
    """uint8 B x C x H x W -> one uint8 C x H' x W' image, ``columns`` per row, with a grey border."""
    count, channels, height, width = images.shape
    rows = (count + columns - 1) // columns
    canvas = torch.full(
        (channels, rows * (height + padding) + padding, columns * (width + padding) + padding), 128, dtype=torch.uint8
    )
    for i in range(count):
        top = padding + (i // columns) * (height + padding)
        left = padding + (i % columns) * (width + padding)
        canvas[:, top : top + height, left : left + width] = images[i]
    return canvas


def png_bytes(image: torch.Tensor) -> bytes:
    """Encode a uint8 image (C x H x W with C = 1 or 3) as PNG."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected uint8 1 x H x W or 3 x H x W, got {image.dtype} {tuple(image.shape)}")
    channels, height, width = image.shape
    pixels = image.permute(1, 2, 0).contiguous().numpy()
    rows = b"".join(b"\x00" + pixels[r].tobytes() for r in range(height))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0 if channels == 1 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def write_png(image: torch.Tensor, path: str | Path) -> None:
    """Write a uint8 C x H x W image as a PNG file (atomically)."""
    data = png_bytes(image)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_grid(images: torch.Tensor, path: str | Path, columns: int) -> None:
    """Write uint8 images B x C x H x W as one PNG grid."""
    write_png(grid(images, columns), path)
