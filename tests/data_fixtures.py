"""Tiny on-disk fixtures for the data reader tests: image trees, RFW, .bin, .rec/.idx.

The RecordIO fixture writer here is deliberately separate from mstkd_jax.formats.recordio.
"""

import io
import os
import pickle
import struct
import zlib

import numpy as np
from PIL import Image

# Small groups with deliberately unsorted identity names; ("name", images, png?).
GROUPS = {
    "Indian": [("n_zeta", 2, False), ("n_alpha", 3, True)],
    "African": [("m.0b", 2, False), ("m.0a", 1, False), ("m.0c", 2, True)],
    "Asian": [("x1", 1, False)],
}
REC_MAGIC = 0xCED7230A


def jpeg_bytes(seed: int, size: int = 12) -> bytes:
  """A small random JPEG; the seed makes each image distinct."""
  rng = np.random.RandomState(seed)
  img = Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8))
  buf = io.BytesIO()
  img.save(buf, "JPEG", quality=90)
  return buf.getvalue()


def png_bytes(seed: int, size: int = 12, mode: str = "RGB") -> bytes:
  rng = np.random.RandomState(seed)
  shape = (size, size, 3) if mode == "RGB" else (size, size)
  img = Image.fromarray(rng.randint(0, 256, shape, dtype=np.uint8))
  buf = io.BytesIO()
  img.save(buf, "PNG")
  return buf.getvalue()


def png_encode(samples: np.ndarray, color_type: int, bit_depth: int, palette=None,
               trns: bytes | None = None) -> bytes:
  """A PNG written from the spec (not by Pillow), for bit depths and types Pillow cannot write.

  Args:
    samples: [H, W] (gray, palette) or [H, W, C] (C = 2 gray+alpha, 3 RGB, 4 RGBA) integers
      below 2**bit_depth.
    color_type: 0 gray, 2 RGB, 3 palette, 4 gray+alpha, 6 RGBA.
    bit_depth: 1, 2, 4, 8 or 16 (as the color type allows).
    palette: [(r, g, b), ...] for color type 3.
    trns: raw tRNS chunk data (palette alphas for color type 3).
  """
  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data +
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

  samples = np.asarray(samples)
  height, width = samples.shape[:2]
  rows = []
  for row in samples.reshape(height, -1):
    if bit_depth == 16:
      packed = row.astype(">u2").tobytes()
    elif bit_depth == 8:
      packed = row.astype(np.uint8).tobytes()
    else:  # Pack 8 // bit_depth samples per byte, most significant first; pad the last.
      per = 8 // bit_depth
      padded = np.zeros(-(-len(row) // per) * per, np.uint8)
      padded[:len(row)] = row
      shifts = np.arange(per - 1, -1, -1) * bit_depth
      packed = (padded.reshape(-1, per) << shifts).sum(axis=1).astype(np.uint8).tobytes()
    rows.append(b"\x00" + packed)  # Filter type 0 (None).
  out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height,
                                                            bit_depth, color_type, 0, 0, 0))
  if palette is not None:
    out += chunk(b"PLTE", bytes(np.asarray(palette, np.uint8).ravel()))
  if trns is not None:
    out += chunk(b"tRNS", trns)
  return out + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b"")


def jpeg_with_magic(seed: int) -> bytes:
  """A valid JPEG whose bytes hold the RecordIO magic at offset 8 (4-aligned) in a comment.

  Packed after the 24-byte image header, the magic stays 4-aligned in the record payload,
  which forces a multi-part record.
  """
  data = jpeg_bytes(seed)
  comment = b"pp" + struct.pack("<I", REC_MAGIC) + b"qq"
  segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
  return data[:2] + segment + data[2:]


def write_file(path: str, data: bytes):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def make_image_tree(root: str, groups=None, grouped: bool = True) -> dict:
  """Writes <root>/<group>/<id>/<k>.jpg|png; returns {group: {id: [image bytes...]}}."""
  groups = GROUPS if groups is None else groups
  seed = 0
  out = {}
  for group, identities in groups.items():
    out[group] = {}
    for name, count, png in identities:
      folder = os.path.join(root, group, name) if grouped else os.path.join(root, name)
      images = []
      for k in range(count):
        seed += 1
        data = png_bytes(seed) if png and k == 0 else jpeg_bytes(seed)
        write_file(os.path.join(folder, f"img_{k:02d}" + (".png" if data[:4] == b"\x89PNG"
                                                            else ".jpg")), data)
        images.append(data)
      out[group][name] = images
  return out


def expected_labels(tree: dict) -> list[tuple[str, str, list[bytes]]]:
  """(group, identity, images) in label order: sorted group, then sorted identity."""
  return [(g, n, tree[g][n]) for g in sorted(tree) for n in sorted(tree[g])]


# RFW: per group, identities with image counts; pairs lines (same and different).
RFW_GROUPS = {
    "African": {"m.0aa": 3, "m.0bb": 2},
    "Asian": {"m.1aa": 2, "m.1bb": 2, "m.1cc": 1},
}
RFW_PAIRS = {
    "African": ["m.0aa\t1\t3", "m.0bb\t1\t2", "m.0aa\t2\tm.0bb\t1"],
    "Asian": ["m.1aa\t1\t2", "m.1aa\t2\tm.1cc\t1", "m.1bb 2 m.1aa 1", "m.1bb\t1\t2"],
}


def make_rfw(root: str) -> dict:
  """Writes <root>/test/{data,txts}; returns {group: [(img1, img2, same), ...]}."""
  images = {}
  seed = 1000
  for group, identities in RFW_GROUPS.items():
    for name, count in identities.items():
      for k in range(1, count + 1):
        seed += 1
        data = jpeg_bytes(seed)
        images[(group, name, k)] = data
        write_file(os.path.join(root, "test", "data", group, name, f"{name}_{k:04d}.jpg"), data)
  expected = {}
  for group, lines in RFW_PAIRS.items():
    write_file(os.path.join(root, "test", "txts", group, f"{group}_pairs.txt"),
               ("\n".join(lines) + "\n").encode())
    pairs = []
    for line in lines:
      t = line.split()
      if len(t) == 3:
        pairs.append((images[(group, t[0], int(t[1]))], images[(group, t[0], int(t[2]))], True))
      else:
        pairs.append((images[(group, t[0], int(t[1]))], images[(group, t[2], int(t[3]))], False))
    expected[group] = pairs
  return expected


def write_bin_fixture(path: str, images, issame, protocol: int = 4):
  with open(path, "wb") as f:
    pickle.dump((list(images), list(issame)), f, protocol=protocol)


def py2_style_bin(images, issame) -> bytes:
  """Hand-assembled protocol-2 pickle as Python 2 wrote it (str as SHORT_BINSTRING)."""
  out = [b"\x80\x02", b"(", b"]", b"("]
  for data in images:
    assert len(data) < 256
    out += [b"U", bytes([len(data)]), data]
  out += [b"e", b"]", b"("]
  out += [b"\x88" if v else b"\x89" for v in issame]
  out += [b"e", b"t", b"."]
  return b"".join(out)


# ----- Independent minimal RecordIO writer (MXNet format). -----

def _rec_record(payload: bytes) -> bytes:
  """Encodes one record; cuts the payload at each 4-aligned magic (dmlc-core's rule)."""
  magic = struct.pack("<I", REC_MAGIC)
  cuts = [i for i in range(0, len(payload) - 3, 4) if payload[i:i + 4] == magic]
  pieces, start = [], 0
  for i in cuts:
    pieces.append(payload[start:i])
    start = i + 4
  pieces.append(payload[start:])
  out = b""
  for n, piece in enumerate(pieces):
    if len(pieces) == 1:
      flag = 0
    else:
      flag = 1 if n == 0 else (3 if n == len(pieces) - 1 else 2)
    out += struct.pack("<II", REC_MAGIC, (flag << 29) | len(piece)) + piece
  return out + b"\x00" * ((4 - len(payload) % 4) % 4)


def _ir_payload(flag: int, label: float, id_: int, labels=(), image: bytes = b"") -> bytes:
  head = struct.pack("<IfQQ", flag, label, id_, 0)
  return head + b"".join(struct.pack("<f", v) for v in labels) + image


def write_rec_fixture(rec_path: str, identities, header: bool = True,
                      image_label_override=None,
                      identity_records: str = "ranges") -> list[tuple[int, int]]:
  """Writes an insightface .rec/.idx for `identities` = [[image bytes, ...] per label].

  Returns [(key, label)] of the image records, label being the identity list it came from.
  image_label_override maps key -> label to write another label in that image's header
  (Glint360K-like packs). identity_records="scalar" writes the identity records as merged
  packs do: flag 0 and the identity's label as a scalar, no key range.
  """
  override = image_label_override or {}
  records = []  # (key, payload)
  images = []
  key = 1 if header else 0
  ranges = []
  for label, imgs in enumerate(identities):
    start = key
    for img in imgs:
      records.append((key, _ir_payload(0, float(override.get(key, label)), key, image=img)))
      images.append((key, label))
      key += 1
    ranges.append((start, key))
  if header:
    first = key
    for j, (s, e) in enumerate(ranges):
      if identity_records == "scalar":
        records.append((first + j, _ir_payload(0, float(j), 0)))
      else:
        records.append((first + j, _ir_payload(2, 0.0, 0, labels=(s, e))))
    records.insert(0, (0, _ir_payload(2, 0.0, 0, labels=(first, first + len(identities)))))
  idx_lines = []
  with open(rec_path, "wb") as f:
    for k, payload in records:
      idx_lines.append(f"{k}\t{f.tell()}\n")
      f.write(_rec_record(payload))
  with open(os.path.splitext(rec_path)[0] + ".idx", "w") as f:
    f.writelines(idx_lines)
  return images


def rec_offsets(rec_path: str) -> dict[int, int]:
  """Reads key -> offset from the fixture's .idx."""
  out = {}
  with open(os.path.splitext(rec_path)[0] + ".idx") as f:
    for line in f:
      k, o = line.split("\t")
      out[int(k)] = int(o)
  return out


# ----- RFW as released: loose crops and their landmarks. -----

# insightface's ArcFace template (arcface_dst), written out here rather than imported.
ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]])


def loosen_rfw(aligned_root: str, loose_root: str, seed: int = 0, canvas: int = 240,
               label_column: bool = True) -> dict:
  """Copies an RFW folder of aligned 112x112 faces as RFW's release ships it: each face
  pasted into a `canvas` x `canvas` JPEG at a random similarity transform (scale 0.8-1.2,
  rotation +-25 degrees, shift +-15 px about the centre), and
  test/txts/<group>/<group>_lmk.txt holding, per image, `/test/data/<group>/<id>/<file>`,
  an integer label and the template's 5 points moved by the same transform (tab-separated,
  as RFW writes it). Pairs files are copied.

  Returns:
    {(group, "<id>/<file>"): the 3x3 matrix mapping aligned (x, y) to loose (x, y)}.
  """
  from skimage.transform import SimilarityTransform, warp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  transforms = {}
  data_root = os.path.join(aligned_root, "test", "data")
  for group in sorted(os.listdir(data_root)):
    lines = []
    for label, identity in enumerate(sorted(os.listdir(os.path.join(data_root, group)))):
      for name in sorted(os.listdir(os.path.join(data_root, group, identity))):
        face = np.asarray(Image.open(os.path.join(data_root, group, identity, name)))
        centre = SimilarityTransform(translation=(-56.0, -56.0))
        move = SimilarityTransform(scale=rng.uniform(0.8, 1.2),
                                   rotation=np.deg2rad(rng.uniform(-25, 25)),
                                   translation=canvas / 2 + rng.uniform(-15, 15, 2))
        transform = SimilarityTransform(matrix=move.params @ centre.params)
        loose = warp(face, transform.inverse, output_shape=(canvas, canvas), order=1,
                     mode="constant", cval=0.0, preserve_range=True)
        buf = io.BytesIO()
        Image.fromarray(np.clip(np.rint(loose), 0, 255).astype(np.uint8)).save(
            buf, "JPEG", quality=95)
        write_file(os.path.join(loose_root, "test", "data", group, identity, name),
                   buf.getvalue())
        points = transform(ARCFACE_TEMPLATE_112).ravel()
        fields = [f"/test/data/{group}/{identity}/{name}"]
        fields += [str(label)] if label_column else []
        lines.append("\t".join(fields + [f"{v:.3f}" for v in points]))
        transforms[(group, f"{identity}/{name}")] = transform.params
    txts = os.path.join(loose_root, "test", "txts", group)
    write_file(os.path.join(txts, f"{group}_lmk.txt"), ("\n".join(lines) + "\n").encode())
    pairs = os.path.join(aligned_root, "test", "txts", group, f"{group}_pairs.txt")
    with open(pairs, "rb") as f:
      write_file(os.path.join(txts, f"{group}_pairs.txt"), f.read())
  return transforms
