"""Reading images: the one way pixels are opened (EXIF orientation applied), image ids, embedded image bytes."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

from capdpo.errors import InputError, one_line
from capdpo.jsonl import stable_id

# Pillow format name -> file suffix of a written image
SUFFIXES = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


def load_image(path: str) -> Any:
    """Open an image as RGB with its EXIF orientation applied."""
    from PIL import Image, ImageOps

    try:
        with open(path, "rb") as fh:
            data = fh.read()
        image = Image.open(io.BytesIO(data))
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read image ({err})") from None


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
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format or ""
            image.verify()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"embedded image bytes are not a readable image ({type(err).__name__})") from None
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
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format or "unknown"
            width, height = image.size
            if fmt == "JPEG":
                # Decoding at 1/8 scale still reads every byte (truncation is still caught) at a fraction of the cost.
                image.draft(None, (max(1, width // 8), max(1, height // 8)))
            image.load()
            # After load(): on a PNG, getexif() decodes the pixels itself, and its errors are swallowed below.
            orientation = _exif_orientation(image)
    except Image.DecompressionBombError as err:
        raise ImageProblem("too_large", f"too many pixels to decode safely ({err})") from None
    except UnidentifiedImageError:
        raise ImageProblem("not_image", "not an image (format not recognised)") from None
    except Exception as err:  # noqa: BLE001 - decoders raise many types on bad data; every one means "unusable"
        if "truncated" in str(err):
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
