"""Safe decoding of shard members: images and UTF-8 captions, nothing else.

webdataset's default decoders unpickle `.pyd`/`.pickle` and torch.load `.pth`
members; shards come from outside, so this module is the only decoder and it
knows two kinds of member. A JSON member (metadata, as img2dataset writes) is
read, within its size bound, but never decoded; everything else is ignored
unread. Each check
raises `BadSample` with a short reason; readers skip the sample and count the
reason (see `SkipCounter`).

Images become 8-bit RGB whatever they were stored as (see `to_rgb`); an
animated WebP or PNG gives its first frame, and no later frame is decoded.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections import Counter

import numpy as np
from PIL import Image, ImageMode

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
METADATA_EXTENSION = "json"
KNOWN_EXTENSIONS = frozenset(IMAGE_EXTENSIONS + (CAPTION_EXTENSION, METADATA_EXTENSION))

MAX_IMAGE_BYTES = 32 * 2**20
MAX_IMAGE_PIXELS = 8192 * 8192  # decompression-bomb guard, checked before any pixel is decoded
# and the bytes those pixels take once decoded (an 8-bit RGB image at the pixel cap): a
# 16-bit or four-channel image of as many pixels would cost more
MAX_DECODED_BYTES = 3 * MAX_IMAGE_PIXELS
MAX_CAPTION_BYTES = 16 * 2**10
MAX_METADATA_BYTES = 2**20
MAX_MEMBER_BYTES = {ext: MAX_IMAGE_BYTES for ext in IMAGE_EXTENSIONS} | {
    CAPTION_EXTENSION: MAX_CAPTION_BYTES,
    METADATA_EXTENSION: MAX_METADATA_BYTES,
}
_PIL_FORMATS = ("JPEG", "PNG", "WEBP")


class BadSample(Exception):
    """A sample that cannot be used; `reason` is a short, countable label, `detail` what
    a log line may add (never where the sample lies: see data.tar_index)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SkipCounter(Counter):
    """Counts skipped samples by reason. Logging is per process (workers hold
    short-lived counters): the 1st, 10th, 100th, ... sample skipped for a reason."""

    def record(self, reason: str, where: str = "") -> None:
        self[reason] += 1
        _SEEN_IN_PROCESS[reason] += 1
        seen = _SEEN_IN_PROCESS[reason]
        if seen == 10 ** (len(str(seen)) - 1):
            log.warning("skipping bad sample (%s) %s; %d skipped for this reason in this process", reason, where, seen)

    @property
    def total(self) -> int:
        return sum(self.values())


_SEEN_IN_PROCESS: Counter = Counter()


def decode_image(data: bytes, draft_size: int | None = None) -> Image.Image:
    """RGB image from JPEG/PNG/WebP bytes; a JPEG much larger than `draft_size`
    is decoded at a reduced scale (DCT scaling), never below `draft_size`."""
    if len(data) > MAX_IMAGE_BYTES:
        raise BadSample("image too large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise BadSample("image too large")
            if draft_size and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            width, height = image.size  # a JPEG's draft decodes fewer
            if width * height * _bytes_per_pixel(image.mode) > MAX_DECODED_BYTES:
                raise BadSample("image too large")
            return to_rgb(image)
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exn:
        raise BadSample("image too large") from exn
    except Exception as exn:  # PIL raises many types on corrupt input
        raise BadSample("undecodable image") from exn


def _bytes_per_pixel(mode: str) -> int:
    """What one pixel of a decoded image in ``mode`` takes: I;16 two bytes, RGBA four."""
    try:
        described = ImageMode.getmode(mode)
    except KeyError as exn:
        raise BadSample(f"unsupported image mode {mode}") from exn
    return len(described.bands) * np.dtype(described.typestr).itemsize


# Transparent pixels are shown as this colour: the page colour most web images
# were drawn on. Dropping the alpha channel instead would show whatever colour
# the transparent pixels happen to store (black, or leftovers of an edit).
TRANSPARENT_BACKGROUND = (255, 255, 255)
_CONVERTIBLE_MODES = frozenset({"1", "L", "P", "RGB", "CMYK", "YCbCr"})  # convert("RGB") is exact for these
_ALPHA_MODES = frozenset({"LA", "PA", "RGBA"})
# a 16-bit greyscale PNG opens as I;16 (as I in older Pillows); its values lie in 0..65535
_SIXTEEN_BIT_GREY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of a decoded image, whatever its mode.

    Pillow's own convert("RGB") gets two cases wrong: it drops transparency
    (composited here over :data:`TRANSPARENT_BACKGROUND`) and it clips 16-bit
    greyscale to 255 instead of scaling it (almost every pixel of a 16-bit PNG
    would come out white; scaled here to its top 8 bits, in the image's own
    integer type: no 8-byte copy per pixel). 16-bit colour PNGs are already
    reduced to 8 bits by Pillow. Other modes are refused.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT_GREY_MODES:
        grey = np.asarray(image)
        if grey.dtype.kind == "i":  # mode I: 32-bit signed, holding 16-bit values
            grey = np.clip(grey, 0, 65535)
        return Image.fromarray((grey >> 8).astype(np.uint8)).convert("RGB")
    if mode in _ALPHA_MODES or (mode in _CONVERTIBLE_MODES and "transparency" in image.info):
        rgba = image.convert("RGBA")
        rgb = Image.new("RGB", image.size, TRANSPARENT_BACKGROUND)
        rgb.paste(rgba, mask=rgba.getchannel("A"))
        return rgb
    if mode in _CONVERTIBLE_MODES:
        return image.convert("RGB")
    raise BadSample(f"unsupported image mode {mode}")


def decode_caption(data: bytes) -> str:
    """Caption text: strict UTF-8, bounded, not blank."""
    if len(data) > MAX_CAPTION_BYTES:
        raise BadSample("caption too long")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as exn:
        raise BadSample("caption not UTF-8") from exn
    if not text:
        raise BadSample("empty caption")
    return text


def decode_sample(members: dict[str, bytes], draft_size: int | None = None,
                  caption_required: bool = True) -> tuple[Image.Image, str]:
    """(RGB image, caption) from a sample's members keyed by lower-case extension; without
    `caption_required` (images alone, for ViP) the caption is "" and never decoded."""
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    if image_ext is None:
        raise BadSample("missing image")
    if not caption_required:
        return decode_image(members[image_ext], draft_size), ""
    if CAPTION_EXTENSION not in members:
        raise BadSample("missing caption")
    caption = decode_caption(members[CAPTION_EXTENSION])
    return decode_image(members[image_ext], draft_size), caption
