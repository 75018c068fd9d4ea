"""The one image decoder: JPEG/PNG bytes to uint8 RGB for every Pillow mode, as OpenCV's
and TensorFlow's decoders give them; PNG encoding; image file names and headers.
"""

import io
import os

import numpy as np
from PIL import Image

from mstkd_jax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Only the formats face data sets use; keeps PIL's many other parsers off untrusted bytes.
DECODABLE_FORMATS = ("JPEG", "PNG")
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_image_file(path: str) -> bytes:
  """The bytes of an image file; UserError naming it if it cannot be read."""
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise UserError(f"{path}: cannot read image file ({e})") from e


# What decode_image makes of each mode Pillow can return. The target is the 8-bit RGB that
# OpenCV's imread(IMREAD_COLOR) (insightface's loader) and TensorFlow's decode_png/jpeg
# (channels=3, the prepared-data input pipeline) give, in RGB order:
# * alpha (LA, PA, RGBA, and palette transparency) is dropped, never composited;
# * 16-bit samples keep their high byte (value >> 8), as OpenCV and TF do;
# * 1, L, P, CMYK and YCbCr go through Pillow's own conversion to RGB;
# * I (32-bit integer) is accepted only from a PNG, where it is a 16-bit grayscale image
#   (Pillow < 10.3 opens those as I; later versions as I;16): its values must lie in
#   [0, 65535] and are scaled like I;16. Elsewhere the mode says nothing about the range.
# * F (32-bit float) is refused: the mode carries no range to scale from, and JPEG/PNG
#   never decode to it.
_GRAY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_PILLOW_TO_RGB_MODES = ("1", "L", "CMYK", "YCbCr")
_DROP_ALPHA_MODES = ("LA", "RGBA")
_PALETTE_MODES = ("P", "PA")


class _Undecodable(Exception):
  """An image that opens but has no faithful 8-bit RGB form; its message is the reason."""


def _open_image(data: bytes, source: str) -> Image.Image:
  """Opens JPEG/PNG bytes with Pillow (headers only); UserError naming `source` otherwise."""
  try:
    return Image.open(io.BytesIO(data), formats=DECODABLE_FORMATS)
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error, ...).
    raise UserError(f"{source}: not a decodable JPEG/PNG image ({type(e).__name__}: {e}); "
                    "expected a complete, uncorrupted image file") from e


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
  return np.repeat(gray[..., None], 3, axis=-1)


def _high_byte(values: np.ndarray) -> np.ndarray:
  """uint8 of 16-bit samples, value >> 8 (what OpenCV and libpng's strip_16 keep)."""
  return (values.astype(np.uint32) >> 8).astype(np.uint8)


def image_to_rgb8(img: Image.Image, source: str) -> np.ndarray:
  """Converts a loaded Pillow image of any supported mode to uint8 [H, W, 3] RGB.

  Args:
    img: an image Pillow has decoded (its `mode` decides the conversion).
    source: the file (or "<file>#<record>") to name in errors.

  Returns:
    uint8 [H, W, 3]: alpha dropped (not composited), 16-bit samples as value >> 8, which
    is what OpenCV's imread(IMREAD_COLOR) and TensorFlow's decode_png(channels=3) give.

  Raises:
    UserError: the mode has no faithful 8-bit RGB form (F, I outside a PNG or outside
      [0, 65535], or a mode JPEG/PNG do not produce); the message names `source` and mode.
  """
  mode = img.mode
  try:
    if mode == "RGB":
      return np.asarray(img, dtype=np.uint8)
    if mode in _PILLOW_TO_RGB_MODES:
      return np.asarray(img.convert("RGB"), dtype=np.uint8)
    if mode in _PALETTE_MODES:
      # Through RGBA: Pillow warns when a palette image with transparency goes to RGB.
      return np.asarray(img.convert("RGBA"), dtype=np.uint8)[..., :3].copy()
    if mode in _DROP_ALPHA_MODES:
      values = np.asarray(img, dtype=np.uint8)
      return _gray_to_rgb(values[..., 0]) if mode == "LA" else values[..., :3].copy()
    if mode in _GRAY16_MODES:
      return _gray_to_rgb(_high_byte(np.asarray(img)))
    if mode == "I":
      if img.format != "PNG":
        raise _Undecodable("32-bit integer samples of unknown range")
      values = np.asarray(img)
      if values.size and (values.min() < 0 or values.max() > 0xFFFF):
        raise _Undecodable(f"samples in [{values.min()}, {values.max()}], outside the "
                           "[0, 65535] of a 16-bit grayscale PNG")
      return _gray_to_rgb(_high_byte(values))
    if mode == "F":
      raise _Undecodable("32-bit float samples of unknown range")
    raise _Undecodable("a mode JPEG/PNG face images do not use")
  except _Undecodable as e:
    raise UserError(f"{source}: image mode {mode!r} ({e}) cannot become 8-bit RGB; expected "
                    "an 8- or 16-bit grayscale, palette, RGB(A) or CMYK JPEG/PNG") from None


def decode_image(data: bytes, source: str) -> np.ndarray:
  """Fully decodes JPEG/PNG bytes to uint8 [H, W, 3] RGB (see `image_to_rgb8`).

  Raises:
    UserError: naming `source`: not a complete JPEG/PNG, or a mode with no 8-bit RGB form.
  """
  with _open_image(data, source) as img:
    try:
      # load() decodes every pixel: verify() alone passes truncated JPEGs.
      img.load()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error, ...).
      raise UserError(f"{source}: not a decodable JPEG/PNG image ({type(e).__name__}: {e}); "
                      "expected a complete, uncorrupted image file") from e
    return image_to_rgb8(img, source)


def encode_png(image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] RGB as PNG bytes (lossless: `decode_image` gives the same pixels)."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def image_size(data: bytes, source: str) -> tuple[int, int]:
  """(height, width) from the JPEG/PNG header alone; UserError naming `source` otherwise."""
  with _open_image(data, source) as img:
    return img.height, img.width


def image_extension(data: bytes, source: str) -> str:
  """Returns ".jpg" or ".png" from the leading bytes; UserError for anything else."""
  if data.startswith(_JPEG_MAGIC):
    return ".jpg"
  if data.startswith(_PNG_MAGIC):
    return ".png"
  raise UserError(f"{source}: not a JPEG or PNG image (starts with {bytes(data[:8])!r})")


def is_image_name(name: str) -> bool:
  """Whether a file name has one of IMAGE_EXTENSIONS (any case)."""
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
