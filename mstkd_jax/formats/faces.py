"""What a model sees of a face image: decoded, aligned, resized, in one place.

`face_image` makes it from one image (of a verification plan, data/pairs.py): decoded to RGB
(formats/images.decode_image), aligned to ALIGNED_SIZE x ALIGNED_SIZE with its 5 landmarks
when the plan has them (RFW's loose crops and their <group>_lmk.txt; an image already
ALIGNED_SIZE square is taken as aligned), then resized to the model's input with
`resize_image`. That is the one resizer of the project: evaluate, embed, IJB, `prepare
--image_size`, the verification sets read during training and the prepared-data training
stream all resize with it, so a model sees the same pixels on every path.
"""

import dataclasses

import numpy as np

from mstkd_jax.formats import align
from mstkd_jax.formats.images import decode_image, read_image_file

RESAMPLING = ("Pillow bilinear (Image.resize BILINEAR: a triangle filter widened by the "
              "reduction factor, so antialiased; horizontal then vertical pass, each rounded "
              "to uint8)")
# The side of an aligned face: formats/align.py's template.
ALIGNED_SIZE = align.TEMPLATE_SIZE


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3] (or [height, width, 3] for a pair),
  resampled as RESAMPLING says: the one resizer of the project."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  height, width = (size, size) if np.ndim(size) == 0 else size
  return np.asarray(Image.fromarray(image).resize((int(width), int(height)), Image.BILINEAR))


@dataclasses.dataclass(frozen=True)
class Face:
  """One image of a plan as `face_image` made it.

  Attributes:
    image: uint8 [H, W, 3] RGB, aligned when it had landmarks, resized when asked.
    aligned: it was warped to ALIGNED_SIZE with its landmarks.
    taken_as_aligned: it had landmarks but was already ALIGNED_SIZE square (kept).
    resized_from: its (height, width) before resizing, or None.
  """
  image: np.ndarray
  aligned: bool = False
  taken_as_aligned: bool = False
  resized_from: tuple[int, int] | None = None


def face_image(data: bytes | None, source: str, image_size: int | None = None,
               landmarks=None, landmarks_file: str | None = None) -> Face:
  """One image as the model sees it: decoded (formats/images.decode_image), aligned with
  its landmarks to ALIGNED_SIZE (formats/align.py) unless already that size, resized to
  image_size x image_size (`resize_image`) when given and different.

  Args:
    data: the encoded image, or None to read the file `source`.
    source: its file (or "<file>#<record>"), for reading and for messages.
    image_size: the model's input side, or None to keep the size.
    landmarks: float [5, 2] (x, y) pixels of the image, or None when it comes aligned.
    landmarks_file: where the landmarks came from, for messages.

  Raises:
    UserError: the image cannot be read or decoded, or its landmarks are degenerate
      (naming the file).
  """
  image = decode_image(read_image_file(source) if data is None else data, source)
  aligned = taken = False
  if landmarks is not None:
    if image.shape[:2] == (ALIGNED_SIZE, ALIGNED_SIZE):
      taken = True
    else:
      image = align.align_face(image, landmarks, ALIGNED_SIZE, f"{landmarks_file} ({source})")
      aligned = True
  resized_from = None
  if image_size and image.shape[:2] != (image_size, image_size):
    resized_from = tuple(int(v) for v in image.shape[:2])
    image = resize_image(image, image_size)
  return Face(image, aligned, taken, resized_from)
