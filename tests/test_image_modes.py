"""Every image mode Pillow can return becomes the right 8-bit RGB, or is refused by name.

References are written here from the formats' definitions: palette lookup, dropping alpha,
16-bit samples as value >> 8 (OpenCV's imread(IMREAD_COLOR) and TF's decode_png), low bit
depths scaled to 0..255, CMYK and YCbCr by their usual formulas.
"""

import io
import warnings

import numpy as np
import pytest
from PIL import Image

import data_fixtures as fx
from mstkd_jax.formats import images
from mstkd_jax.errors import UserError

H, W = 5, 7
# 16-bit values around every byte boundary: saturating at 255 would show at once.
_VALUES16 = np.asarray([0, 1, 255, 256, 0x1234, 0x7FFF, 0x8000, 0xFEFF, 0xFF00, 0xFFFF])


def _rng(seed=0):
  return np.random.default_rng(seed)


def _gray(values):
  return np.repeat(np.asarray(values, np.uint8)[..., None], 3, axis=-1)


def _samples16(seed=0, shape=(H, W)):
  rng = _rng(seed)
  values = rng.integers(0, 1 << 16, shape, dtype=np.int64)
  values.reshape(-1)[:len(_VALUES16)] = _VALUES16
  return values


def _convert(img, source="face.png"):
  out = images.image_to_rgb8(img, source)
  assert out.dtype == np.uint8 and out.shape == (img.height, img.width, 3)
  return out


# --- Modes, from images built in memory ------------------------------------------------


def test_mode_1_is_black_or_white():
  bits = _rng(1).integers(0, 2, (H, W)).astype(bool)
  img = Image.fromarray(bits)
  assert img.mode == "1"
  np.testing.assert_array_equal(_convert(img), _gray(np.where(bits, 255, 0)))


def test_mode_l_and_la_drop_alpha():
  data = _rng(2).integers(0, 256, (H, W, 2), dtype=np.uint8)
  np.testing.assert_array_equal(_convert(Image.frombytes("L", (W, H), data[..., 0].tobytes())),
                                _gray(data[..., 0]))
  np.testing.assert_array_equal(_convert(Image.frombytes("LA", (W, H), data.tobytes())),
                                _gray(data[..., 0]))


@pytest.mark.parametrize("mode,transparency", [("P", None), ("P", 3), ("P", "bytes"),
                                               ("PA", None)])
def test_palette_modes_look_up_colours_and_drop_alpha(mode, transparency):
  rng = _rng(3)
  palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
  index = rng.integers(0, 256, (H, W), dtype=np.uint8)
  alpha = rng.integers(0, 256, (H, W), dtype=np.uint8)
  raw = index if mode == "P" else np.stack([index, alpha], axis=-1)
  img = Image.frombytes(mode, (W, H), raw.tobytes())
  img.putpalette(palette.ravel().tolist())
  if transparency == "bytes":
    img.info["transparency"] = bytes(rng.integers(0, 256, 256, dtype=np.uint8))
  elif transparency is not None:
    img.info["transparency"] = transparency
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # Pillow warns on P + transparency -> RGB.
    np.testing.assert_array_equal(_convert(img), palette[index])


def test_rgb_and_rgba():
  data = _rng(4).integers(0, 256, (H, W, 4), dtype=np.uint8)
  rgb = np.ascontiguousarray(data[..., :3])
  np.testing.assert_array_equal(_convert(Image.frombytes("RGB", (W, H), rgb.tobytes())), rgb)
  np.testing.assert_array_equal(_convert(Image.frombytes("RGBA", (W, H), data.tobytes())), rgb)


def test_cmyk():
  cmyk = _rng(5).integers(0, 256, (H, W, 4), dtype=np.uint8)
  cmyk.reshape(-1, 4)[:4] = [[0, 0, 0, 0], [255, 255, 255, 255], [255, 0, 0, 0], [0, 0, 0, 255]]
  c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
  expected = (255 - c) * (255 - k) / 255  # The naive CMYK -> RGB formula.
  got = _convert(Image.frombytes("CMYK", (W, H), cmyk.tobytes())).astype(np.float64)
  np.testing.assert_allclose(got, expected, atol=1.0)
  np.testing.assert_array_equal(got.reshape(-1, 3)[:4], [[255] * 3, [0] * 3, [0, 255, 255],
                                                        [0] * 3])


def test_ycbcr():
  ycc = _rng(6).integers(0, 256, (H, W, 3), dtype=np.uint8).astype(np.float64)
  y, cb, cr = ycc[..., 0], ycc[..., 1] - 128, ycc[..., 2] - 128
  # JPEG (JFIF) full-range BT.601.
  expected = np.clip(np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr,
                               y + 1.772 * cb], axis=-1), 0, 255)
  got = _convert(Image.frombytes("YCbCr", (W, H), ycc.astype(np.uint8).tobytes()))
  np.testing.assert_allclose(got.astype(np.float64), expected, atol=1.5)


@pytest.mark.parametrize("mode,dtype", [("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2"),
                                        ("I;16N", "=u2")])
def test_16_bit_grayscale_keeps_the_high_byte(mode, dtype):
  values = _samples16(7)
  img = Image.frombytes(mode, (W, H), values.astype(dtype).tobytes())
  assert img.getpixel((0, 0)) == int(values[0, 0])  # The bytes are read as meant.
  got = _convert(img)
  np.testing.assert_array_equal(got, _gray(values // 256))
  assert got.reshape(-1, 3)[:len(_VALUES16), 0].tolist() == [0, 0, 0, 1, 0x12, 0x7F, 0x80,
                                                             0xFE, 0xFF, 0xFF]


def test_32_bit_integer_only_from_a_16_bit_png():
  values = _samples16(8)
  img = Image.frombytes("I", (W, H), values.astype("=i4").tobytes())
  with pytest.raises(UserError, match=r"^face\.png: image mode 'I' \(32-bit integer samples "
                     r"of unknown range\) cannot become 8-bit RGB"):
    _convert(img)
  img.format = "PNG"  # How Pillow < 10.3 opens a 16-bit grayscale PNG.
  np.testing.assert_array_equal(_convert(img), _gray(values // 256))
  values[1, 1] = 70000
  img = Image.frombytes("I", (W, H), values.astype("=i4").tobytes())
  img.format = "PNG"
  with pytest.raises(UserError, match=r"face\.png: image mode 'I' \(samples in \[0, 70000\]"):
    _convert(img)


@pytest.mark.parametrize("mode", ["F", "HSV", "LAB", "RGBa", "La"])
def test_modes_without_an_8_bit_rgb_form_are_refused(mode):
  try:
    img = Image.new(mode, (W, H))
  except ValueError:
    pytest.skip(f"this Pillow has no mode {mode}")
  with pytest.raises(UserError, match=rf"^some/dir/x\.png#3: image mode '{mode}' .*cannot "
                     "become 8-bit RGB"):
    _convert(img, "some/dir/x.png#3")


# --- Files: PNG written from the spec, one per colour type and bit depth ----------------


def _png_cases():
  rng = _rng(9)
  cases = {}
  for depth in (1, 2, 4, 8):
    gray = rng.integers(0, 1 << depth, (H, W))
    cases[f"gray{depth}"] = (fx.png_encode(gray, 0, depth),
                             _gray(gray * 255 // ((1 << depth) - 1)))
  gray16 = _samples16(10)
  cases["gray16"] = (fx.png_encode(gray16, 0, 16), _gray(gray16 >> 8))
  rgb16 = _samples16(11, (H, W, 3))
  cases["rgb16"] = (fx.png_encode(rgb16, 2, 16), (rgb16 >> 8).astype(np.uint8))
  rgb8 = rng.integers(0, 256, (H, W, 3))
  cases["rgb8"] = (fx.png_encode(rgb8, 2, 8), rgb8.astype(np.uint8))
  # tRNS: one transparent colour, dropped like an alpha channel.
  cases["rgb8_trns"] = (fx.png_encode(rgb8, 2, 8, trns=bytes([0, rgb8[0, 0, 0]] * 3)),
                        rgb8.astype(np.uint8))
  gray8 = rng.integers(0, 256, (H, W))
  cases["gray8_trns"] = (fx.png_encode(gray8, 0, 8, trns=bytes([0, gray8[0, 0]])),
                         _gray(gray8))
  cases["gray16_trns"] = (fx.png_encode(gray16, 0, 16, trns=b"\x12\x34"), _gray(gray16 >> 8))
  la8 = rng.integers(0, 256, (H, W, 2))
  cases["gray_alpha8"] = (fx.png_encode(la8, 4, 8), _gray(la8[..., 0]))
  la16 = _samples16(12, (H, W, 2))
  cases["gray_alpha16"] = (fx.png_encode(la16, 4, 16), _gray(la16[..., 0] >> 8))
  rgba8 = rng.integers(0, 256, (H, W, 4))
  cases["rgba8"] = (fx.png_encode(rgba8, 6, 8), rgba8[..., :3].astype(np.uint8))
  rgba16 = _samples16(13, (H, W, 4))
  cases["rgba16"] = (fx.png_encode(rgba16, 6, 16), (rgba16[..., :3] >> 8).astype(np.uint8))
  palette = rng.integers(0, 256, (16, 3))
  index = rng.integers(0, 16, (H, W))
  for depth in (4, 8):
    cases[f"palette{depth}"] = (fx.png_encode(index, 3, depth, palette=palette),
                                palette[index].astype(np.uint8))
  cases["palette_trns"] = (
      fx.png_encode(index, 3, 8, palette=palette, trns=bytes(range(0, 256, 16))),
      palette[index].astype(np.uint8))
  return cases


_PNG_CASES = _png_cases()


@pytest.mark.parametrize("kind", sorted(_PNG_CASES))
def test_png_files_decode_to_the_reference(kind):
  data, expected = _PNG_CASES[kind]
  got = images.decode_image(data, f"{kind}.png")
  assert got.dtype == np.uint8 and got.shape == (H, W, 3)
  np.testing.assert_array_equal(got, expected)
  assert images.image_size(data, f"{kind}.png") == (H, W)


def test_16_bit_grayscale_png_is_not_white():
  data, expected = _PNG_CASES["gray16"]
  got = images.decode_image(data, "g16.png")
  assert (got < 255).mean() > 0.9  # Saturated decoding gave 255 everywhere.
  np.testing.assert_array_equal(got, expected)


def test_cmyk_jpeg_file():
  cmyk = _rng(14).integers(0, 256, (16, 16, 4), dtype=np.uint8)
  buf = io.BytesIO()
  Image.frombytes("CMYK", (16, 16), cmyk.tobytes()).save(buf, "JPEG", quality=95)
  data = buf.getvalue()
  with Image.open(io.BytesIO(data)) as img:
    assert img.mode == "CMYK"
    stored = np.asarray(img).astype(np.float64)  # The CMYK samples the file holds.
  expected = (255 - stored[..., :3]) * (255 - stored[..., 3:]) / 255
  got = images.decode_image(data, "cmyk.jpg").astype(np.float64)
  np.testing.assert_allclose(got, expected, atol=1.0)


def test_tensorflow_decodes_the_same_pixels():
  # Training reads prepared images with tf.io.decode_png(channels=3): the same RGB.
  tf = pytest.importorskip("tensorflow")
  for kind, (data, expected) in sorted(_PNG_CASES.items()):
    np.testing.assert_array_equal(tf.io.decode_png(data, channels=3).numpy(), expected,
                                  err_msg=kind)
