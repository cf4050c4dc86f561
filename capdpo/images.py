"""Reading images: the one way pixels are opened (EXIF orientation applied), image ids, embedded image bytes.

Every image capdpo reads is held to two limits before it is decoded (`LIMITS`; the run config's
`max_image_pixels` and `max_image_bytes` set them): a file or cell larger than `bytes`, or a header that claims
more than `pixels` pixels, is refused (stage 1 and the importer list it in their errors file) instead of being
decoded. A 400 KB PNG can claim 144 million pixels; decoding it would take gigabytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capdpo.errors import InputError, one_line
from capdpo.jsonl import stable_id

# Pillow format name -> file suffix of a written image
SUFFIXES = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


@dataclass
class Limits:
    """The largest image capdpo decodes (defaults well above any photograph: 100 megapixels, 100 MiB)."""

    pixels: int = 100_000_000
    bytes: int = 100 * 2**20


LIMITS = Limits()


def set_limits(pixels: int, size: int) -> None:
    """Set `LIMITS` for this process (Pillow's own decompression-bomb guard follows the pixel limit)."""
    from PIL import Image

    LIMITS.pixels, LIMITS.bytes = pixels, size
    Image.MAX_IMAGE_PIXELS = pixels


def over_limits(size: int | None = None, width: int | None = None, height: int | None = None) -> str | None:
    """Why an image of `size` bytes and `width` x `height` pixels is refused, or None."""
    if size is not None and size > LIMITS.bytes:
        return f"{size / 2**20:.1f} MiB, over the limit of {LIMITS.bytes / 2**20:.1f} MiB (max_image_bytes)"
    if width is not None and height is not None and width * height > LIMITS.pixels:
        return (
            f"{width}x{height} = {width * height / 1e6:.1f} M pixels, over the limit of {LIMITS.pixels / 1e6:.1f} M "
            "(max_image_pixels)"
        )
    return None


def load_image(path: str) -> Any:
    """Open an image as RGB with its EXIF orientation applied (within `LIMITS`)."""
    from PIL import Image, ImageOps

    try:
        problem = over_limits(size=os.path.getsize(path))
        if problem:
            raise InputError(f"{path}: image too large ({problem})")
        with open(path, "rb") as fh:
            data = fh.read()
        image = Image.open(io.BytesIO(data))
        problem = over_limits(width=image.width, height=image.height)
        if problem:
            raise InputError(f"{path}: image too large ({problem})")
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"{path}: cannot read image ({one_line(err)})") from None


def image_content_id(path: str) -> str:
    """An image's id as stage 1 computes it (first 20 hex digits of the file's sha256), or a hash of the path
    when the file cannot be read."""
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()[:20]
    except OSError:
        return stable_id("image-path", path)


def materialize_image(data: bytes, folder: Path) -> tuple[str, str]:
    """Write image bytes once to `folder/<sha256[:20]>.<ext>`; return (path, image id).

    Raises:
        ValueError: the bytes are not an image Pillow can read.
    """
    from PIL import Image, UnidentifiedImageError

    digest = hashlib.sha256(data).hexdigest()
    problem = over_limits(size=len(data))
    if problem:
        raise ValueError(f"embedded image too large ({problem})")
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format or ""
            problem = over_limits(width=image.width, height=image.height)
            image.verify()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"embedded image bytes are not a readable image ({type(err).__name__})") from None
    if problem:
        raise ValueError(f"embedded image too large ({problem})")
    path = folder / f"{digest[:20]}.{SUFFIXES.get(kind, kind.lower() or 'img')}"
    if not (path.is_file() and path.stat().st_size == len(data)):
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    return str(path.resolve()), digest[:20]


# EXIF orientations 5-8 turn the stored pixels by 90 degrees: the displayed image has width and height swapped.
_ROTATED_ORIENTATIONS = {5, 6, 7, 8}


class ImageProblem(Exception):
    """Why an image file cannot be used; `kind` groups the reasons in stats."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def inspect_image(data: bytes) -> tuple[int, int, str]:
    """Decode an image fully (without keeping it) and return its displayed width, height and format.

    Raises:
        ImageProblem: empty, not an image, truncated, corrupt or too large to decode safely.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageProblem("empty", "empty file (0 bytes)")
    problem = over_limits(size=len(data))
    if problem:
        raise ImageProblem("too_large", f"file too large ({problem})")
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format or "unknown"
            width, height = image.size
            problem = over_limits(width=width, height=height)
            if problem:  # decided from the header: the pixels are never decoded
                raise ImageProblem("too_large", f"too many pixels ({problem})")
            if fmt == "JPEG":
                # Decoding at 1/8 scale still reads every byte (truncation is still caught) at a fraction of the cost.
                image.draft(None, (max(1, width // 8), max(1, height // 8)))
            image.load()
            # After load(): on a PNG, getexif() decodes the pixels itself, and its errors are swallowed below.
            orientation = _exif_orientation(image)
    except ImageProblem:
        raise
    except Image.DecompressionBombError as err:
        raise ImageProblem("too_large", f"too many pixels ({one_line(err)}; max_image_pixels)") from None
    except UnidentifiedImageError:
        raise ImageProblem("not_image", "not an image (format not recognised)") from None
    except Exception as err:  # noqa: BLE001 - decoders raise many types on bad data; every one means "unusable"
        if "truncated" in str(err).lower():
            raise ImageProblem("truncated", f"truncated image file ({one_line(err)})") from None
        raise ImageProblem("corrupt", f"corrupt image data ({one_line(err)})") from None
    if orientation in _ROTATED_ORIENTATIONS:
        width, height = height, width
    return width, height, fmt


def _exif_orientation(image: Any) -> int:
    try:
        value = image.getexif().get(0x0112, 1)
        return int(value)
    except Exception:  # noqa: BLE001 - a malformed EXIF block only means "no orientation"
        return 1


def row_group_over_limits(handle: Any, group: int, column: str) -> str | None:
    """Why a parquet row group's image column is not read at all, or None: its uncompressed size (from the file's
    metadata, before any decompression) exceeds the byte limit for every one of its rows, so at least one cell is
    over it. An 11 KB file can hold a cell that inflates to hundreds of MB."""
    meta = handle.metadata.row_group(group)
    size = sum(
        meta.column(i).total_uncompressed_size
        for i in range(meta.num_columns)
        if meta.column(i).path_in_schema.split(".")[0] == column
    )
    if size > LIMITS.bytes * max(meta.num_rows, 1):
        return (
            f"row group {group} holds {size / 2**20:.1f} MiB of '{column}' data for {meta.num_rows} row(s), over "
            f"{LIMITS.bytes / 2**20:.1f} MiB per image (max_image_bytes); its rows are skipped unread"
        )
    return None
