"""Tests for the image tree, RFW, verification .bin and RecordIO readers/writers."""

import io
import os
import pickle
import pickletools
import re
import shutil
import struct

import numpy as np
import pytest

import data_fixtures as fx
from mstkd_jax.formats import image_tree
from mstkd_jax.formats.images import decode_image
from mstkd_jax.formats.recordio import codec, face_pack
from mstkd_jax.formats.recordio.reader import RecordIOReader
from mstkd_jax.formats.recordio.writer import RecordIOWriter
from mstkd_jax.formats import rfw
from mstkd_jax.formats import verification_bin
from mstkd_jax.errors import UserError


# ----- Image tree -----

def test_tree_counts_labels_and_images(tmp_path):
  tree = fx.make_image_tree(str(tmp_path / "bupt"))
  fx.write_file(str(tmp_path / "bupt" / "African" / "m.0a" / ".DS_Store"), b"junk")
  reader = image_tree.ImageTreeReader(str(tmp_path / "bupt"))
  index = reader.index
  assert reader.grouped
  assert index.group_names == ("African", "Asian", "Indian")
  assert index.summary() == {
      "groups": {"African": {"images": 5, "identities": 3},
                 "Asian": {"images": 1, "identities": 1},
                 "Indian": {"images": 5, "identities": 2}},
      "images": 11, "identities": 6}
  expected = fx.expected_labels(tree)
  assert [index.identity_key(i) for i in range(6)] == [f"{g}/{n}" for g, n, _ in expected]
  assert index.identity_range("Indian") == range(4, 6)
  records = list(reader)
  assert [(r.identity, r.image) for r in records] == [
      (label, img) for label, (_, _, imgs) in enumerate(expected) for img in imgs]
  assert all(index.group_names[r.group] == expected[r.identity][0] for r in records)
  assert records[0].source.endswith(os.path.join("African", "m.0a", "img_00.jpg"))
  assert reader.skipped == []


def test_tree_without_groups(tmp_path):
  fx.make_image_tree(str(tmp_path / "flat"), {"g": [("b", 2, False), ("a", 1, True)]},
                     grouped=False)
  reader = image_tree.ImageTreeReader(str(tmp_path / "flat"))
  assert not reader.grouped
  assert reader.index.identity_names == ("a", "b")
  assert reader.index.summary() == {"groups": {}, "images": 3, "identities": 2}
  assert [(r.identity, r.group) for r in reader] == [(0, -1), (1, -1), (1, -1)]


def test_decode_image():
  rgb = decode_image(fx.jpeg_bytes(1, size=10), "x.jpg")
  assert rgb.shape == (10, 10, 3) and rgb.dtype == np.uint8
  gray = decode_image(fx.png_bytes(2, size=7, mode="L"), "g.png")
  assert gray.shape == (7, 7, 3)
  with pytest.raises(UserError, match=r"bad\.jpg: not a decodable"):
    decode_image(fx.jpeg_bytes(1)[:-40], "bad.jpg")


def _tree_error(root, match, **kw):
  with pytest.raises(UserError, match=match):
    list(image_tree.ImageTreeReader(root, **kw))


def test_tree_structure_errors(tmp_path):
  root = str(tmp_path / "t")
  _tree_error(root, r"t: image tree folder does not exist")
  fx.make_image_tree(root)
  os.makedirs(os.path.join(root, "Caucasian"))
  _tree_error(root, r"Caucasian: empty group; expected identity folders")
  os.makedirs(os.path.join(root, "Caucasian", "c1"))
  _tree_error(root, r"c1: identity folder has no images")
  fx.write_file(os.path.join(root, "Caucasian", "c1", "notes.txt"), b"hello")
  _tree_error(root, r"notes\.txt: not an image file")


def test_tree_non_image_file_skipped_when_asked(tmp_path):
  root = str(tmp_path / "t")
  fx.make_image_tree(root)
  fx.write_file(os.path.join(root, "Asian", "x1", "list.txt"), b"x")
  reader = image_tree.ImageTreeReader(root, skip_corrupt=True)
  assert len(list(reader)) == 11
  assert [os.path.basename(s) for s, _ in reader.skipped] == ["list.txt"]


def test_tree_layout_mismatch(tmp_path):
  root = str(tmp_path / "t")
  fx.make_image_tree(root)
  with pytest.raises(UserError, match=r"unexpected folder; expected only .*grouped=True"):
    image_tree.ImageTreeReader(root, grouped=False)
  fx.write_file(os.path.join(root, "Asian", "stray.jpg"), fx.jpeg_bytes(3))
  _tree_error(root, r"stray\.jpg: unexpected file; expected only identity folders")


def test_tree_corrupt_images(tmp_path):
  root = str(tmp_path / "t")
  fx.make_image_tree(root)
  truncated = os.path.join(root, "Indian", "n_zeta", "img_01.jpg")
  with open(truncated, "rb") as f:
    data = f.read()
  with open(truncated, "wb") as f:
    f.write(data[:len(data) // 2])
  fake = os.path.join(root, "African", "m.0b", "img_01.jpg")
  with open(fake, "wb") as f:
    f.write(b"this is not a jpeg")
  _tree_error(root, r"m\.0b.img_01\.jpg: not a decodable JPEG/PNG")
  os.remove(fake)
  shutil.copy(os.path.join(root, "African", "m.0b", "img_00.jpg"), fake)
  _tree_error(root, r"n_zeta.img_01\.jpg: not a decodable JPEG/PNG .*(?i:truncated)")
  # Listing alone does not decode.
  assert len(list(image_tree.ImageTreeReader(root, validate=False))) == 11
  reader = image_tree.ImageTreeReader(root, skip_corrupt=True)
  records = list(reader)
  assert len(records) == 10
  assert [s for s, _ in reader.skipped] == [truncated]
  # The skipped image's identity keeps its label; nothing else shifts.
  assert sorted({r.identity for r in records}) == list(range(6))


# ----- RFW -----

def test_rfw_pairs(tmp_path):
  expected = fx.make_rfw(str(tmp_path / "RFW"))
  reader = rfw.RFWReader(str(tmp_path / "RFW"))
  assert reader.groups == ("African", "Asian")
  assert rfw.RFWReader(str(tmp_path / "RFW" / "test")).groups == reader.groups
  pairs = reader.pairs("Asian")
  assert pairs[1] == rfw.PairSpec("m.1aa", 2, "m.1cc", 1, False, 2)
  assert pairs[2] == rfw.PairSpec("m.1bb", 2, "m.1aa", 1, False, 3)
  for group in reader.groups:
    got = [(p.image1, p.image2, p.same) for p in reader.iter_pairs(group)]
    assert got == expected[group]
  assert reader.summary() == {"groups": {
      "African": {"pairs": 3, "same": 2, "different": 1},
      "Asian": {"pairs": 4, "same": 2, "different": 2}}}


def test_rfw_lfw_header_and_blank_lines(tmp_path):
  path = str(tmp_path / "pairs.txt")
  fx.write_file(path, b"1\t2\n\nA 1 2\nA 1 B 3\n")
  assert rfw.parse_pairs_file(path) == [rfw.PairSpec("A", 1, "A", 2, True, 3),
                                        rfw.PairSpec("A", 1, "B", 3, False, 4)]


@pytest.mark.parametrize("line,match", [
    ("m.0aa 1", r"African_pairs\.txt:2: cannot parse"),
    ("m.0aa one 2", r"African_pairs\.txt:2: .*not an image number"),
    ("m.0aa 0 2", r"African_pairs\.txt:2: .*1-based"),
    ("m.0aa \u00b2 1", r"African_pairs\.txt:2: .*not an image number"),
    ("m.0aa 1 m.0aa 2", r"African_pairs\.txt:2: different-identity line"),
    ("m.0aa 1 9", r"African_pairs\.txt:2: pair 1 names image 9 of .m\.0aa.*m\.0aa_0009\.jpg"),
    ("m.0aa 1 m.0zz 1", r"African_pairs\.txt:2: pair 1 names image 1 of .m\.0zz"),
    ("../x 1 2", r"African_pairs\.txt:2: identity name"),
])
def test_rfw_bad_pairs(tmp_path, line, match):
  fx.make_rfw(str(tmp_path / "RFW"))
  path = tmp_path / "RFW" / "test" / "txts" / "African" / "African_pairs.txt"
  path.write_text("m.0aa\t1\t2\n" + line + "\n")
  with pytest.raises(UserError, match=match):
    rfw.RFWReader(str(tmp_path / "RFW")).pairs("African")


def test_rfw_missing_parts(tmp_path):
  with pytest.raises(UserError, match="RFW folder does not exist"):
    rfw.RFWReader(str(tmp_path / "nope"))
  fx.make_rfw(str(tmp_path / "RFW"))
  shutil.rmtree(tmp_path / "RFW" / "test" / "data" / "Asian")
  with pytest.raises(UserError, match=r"Asian: image folder of group"):
    rfw.RFWReader(str(tmp_path / "RFW"))
  os.remove(tmp_path / "RFW" / "test" / "txts" / "African" / "African_pairs.txt")
  with pytest.raises(UserError, match=r"African_pairs\.txt: pairs file does not exist"):
    rfw.RFWReader(str(tmp_path / "RFW"), groups=["African"])


# ----- Verification .bin -----

def test_bin_round_trip(tmp_path):
  images = [fx.jpeg_bytes(i) for i in range(6)]
  path = str(tmp_path / "x.bin")
  verification_bin.write_verification_bin(path, images, [True, False, True])
  assert verification_bin.load_verification_bin(path) == (images, [True, False, True])
  # What insightface's own loader does with it.
  with open(path, "rb") as f:
    assert pickle.load(f, encoding="bytes") == (images, [True, False, True])
  pickletools.dis(open(path, "rb").read(), out=io.StringIO())
  empty = str(tmp_path / "empty.bin")
  verification_bin.write_verification_bin(empty, [], [])
  assert verification_bin.load_verification_bin(empty) == ([], [])
  with pytest.raises(UserError, match=r"empty\.bin: 1 images for 1 pairs"):
    verification_bin.write_verification_bin(empty, images[:1], [True])
  assert not os.path.exists(empty + ".partial")
  pairs = list(verification_bin.iter_verification_pairs(path, validate=True))
  assert [(p.image1, p.image2, p.same) for p in pairs] == [
      (images[0], images[1], True), (images[2], images[3], False), (images[4], images[5], True)]
  arrays, issame = verification_bin.decode_verification_images(path)
  assert arrays.shape == (6, 12, 12, 3) and issame.tolist() == [True, False, True]


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_bin_numpy_images_all_protocols(tmp_path, protocol):
  images = [fx.jpeg_bytes(1), fx.jpeg_bytes(2)]
  path = str(tmp_path / "np.bin")
  fx.write_bin_fixture(path, [np.frombuffer(b, np.uint8).copy() for b in images], [False],
                       protocol=protocol)
  assert verification_bin.load_verification_bin(path) == (images, [False])
  fx.write_bin_fixture(path, images, [True], protocol=protocol)
  assert verification_bin.load_verification_bin(path) == (images, [True])


def test_bin_py2_pickle(tmp_path):
  path = tmp_path / "py2.bin"
  path.write_bytes(fx.py2_style_bin([b"\xff\xd8ab", b"cd", b"", b"ef"], [True, False]))
  assert verification_bin.load_verification_bin(str(path)) == (
      [b"\xff\xd8ab", b"cd", b"", b"ef"], [True, False])


def _opencv_style(data: bytes) -> np.ndarray:
  """What cv2.imencode returns for encoded bytes: a uint8 array of shape (N, 1)."""
  return np.frombuffer(data, np.uint8).reshape(-1, 1).copy()


_ISSAME_KINDS = {
    "numpy bool array": lambda v: np.asarray(v, bool),
    "numpy bool scalars": lambda v: [np.bool_(x) for x in v],
    "0/1 ints": lambda v: [int(x) for x in v],
    "numpy int64 array": lambda v: np.asarray(v, np.int64),
    "numpy integer scalars": lambda v: [np.uint8(x) if k % 2 else np.int64(x)
                                        for k, x in enumerate(v)],
    "tuple of bools": tuple,
}


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("kind", sorted(_ISSAME_KINDS))
def test_bin_home_made_opencv_arrays_and_numpy_issame(tmp_path, protocol, kind):
  images = [fx.jpeg_bytes(i) for i in range(6)]
  issame = [True, False, True]
  path = tmp_path / "home.bin"
  path.write_bytes(pickle.dumps(([_opencv_style(b) for b in images], _ISSAME_KINDS[kind](issame)),
                                protocol=protocol))
  # insightface's loader: pickle.load, then imdecode(np.frombuffer(image)) per image.
  with open(path, "rb") as f:
    bins, same = pickle.load(f, encoding="bytes")
  assert [np.frombuffer(b, np.uint8).tobytes() for b in bins] == images
  assert [bool(x) for x in same] == issame
  got_images, got_issame = verification_bin.load_verification_bin(str(path))
  assert got_images == images and got_issame == issame
  assert all(type(v) is bool for v in got_issame)
  arrays, flags = verification_bin.decode_verification_images(str(path))
  assert arrays.shape == (6, 12, 12, 3) and flags.tolist() == issame


def _numpy1_names(data: bytes) -> bytes:
  """A protocol 0-2 pickle as numpy 1.x writes it: numpy.core instead of numpy._core."""
  assert b"numpy._core" in data
  return data.replace(b"cnumpy._core.", b"cnumpy.core.")


@pytest.mark.parametrize("protocol", [0, 2])
def test_bin_numpy_1_pickles(tmp_path, protocol):
  images = [fx.jpeg_bytes(7), fx.png_bytes(8), fx.jpeg_bytes(9), fx.jpeg_bytes(10)]
  data = pickle.dumps(([_opencv_style(b) for b in images], [np.bool_(False), np.bool_(True)]),
                      protocol=protocol)
  path = tmp_path / "np1.bin"
  path.write_bytes(_numpy1_names(data))
  assert b"numpy._core" not in path.read_bytes()
  assert verification_bin.load_verification_bin(str(path)) == (images, [False, True])
  path.write_bytes(_numpy1_names(pickle.dumps((images, np.asarray([0, 1], np.int32)),
                                              protocol=protocol)))
  assert verification_bin.load_verification_bin(str(path)) == (images, [False, True])


def test_bin_any_contiguous_uint8_array_is_its_bytes(tmp_path):
  data = fx.jpeg_bytes(11)
  square = np.frombuffer(data[:len(data) // 2 * 2], np.uint8).reshape(2, -1)
  for array in (square, np.asfortranarray(square), np.frombuffer(data, np.uint8)[None, :]):
    path = str(tmp_path / "shapes.bin")
    fx.write_bin_fixture(path, [array, data], [True], protocol=2)
    # The array's memory in order, as np.frombuffer (insightface) reads it.
    assert verification_bin.load_verification_bin(path)[0][0] == memoryview(array).tobytes(
        order="A")


class _Reduce:
  """Pickles as `function(*args)` (then BUILD `state`): hand-crafts numpy's pickle calls."""

  def __init__(self, function, *args, state=None):
    self.function, self.args, self.state = function, args, state

  def __reduce__(self):
    if self.state is None:
      return self.function, self.args
    return self.function, self.args, self.state


# numpy's own reconstruction functions, whatever the numpy version calls their module.
_SCALAR = np.bool_(True).__reduce__()[0]
_RECONSTRUCT = np.zeros(1, np.uint8).__reduce__()[0]


@pytest.mark.parametrize("issame,match", [
    ([np.float64(1.0)], r"refused to load: numpy dtype .f8"),
    ([np.int64(2)], r"issame\[0\] is 2; expected True/False \(or 0/1\)"),
    (np.asarray([[True]]), r"issame is a numpy bool array of shape \(1, 1\)"),
    ([_Reduce(_SCALAR, np.dtype("u1"), b"\x01\x02")],
     r"numpy scalar of dtype \|u1 with 2 bytes"),
    ([_Reduce(_SCALAR, np.dtype(bool), b"\x02")],
     r"numpy bool data with bytes other than 0 and 1"),
    ([_Reduce(_SCALAR, np.dtype(object), [os.system])],
     r"numpy dtype .O"),
])
def test_bin_refuses_other_numpy_issame(tmp_path, issame, match):
  path = tmp_path / "bad.bin"
  path.write_bytes(pickle.dumps(([b"a", b"b"], issame), protocol=2))
  with pytest.raises(UserError, match=r"bad\.bin: .*" + match):
    verification_bin.load_verification_bin(str(path))


def test_bin_numpy_reconstruction_cannot_be_abused(tmp_path):
  marker = tmp_path / "pwned"
  attacks = [
      # An array whose state holds Python objects instead of raw bytes.
      (_Reduce(_RECONSTRUCT, np.ndarray, (0,), b"b",
               state=(1, (2,), np.dtype("u1"), False, [1, 2])),
       "numpy array that is not a plain bool or integer array"),
      # An array rebuilt without its state.
      (_Reduce(_RECONSTRUCT, np.ndarray, (0,), b"b"), "image 0 is an incomplete numpy array"),
      # _reconstruct asked for another class, or a scalar whose dtype is a call.
      (_Reduce(_RECONSTRUCT, _Reduce(os.system, f"touch {marker}"), (0,), b"b"),
       f"global {os.system.__module__}.system is not allowed"),
      (_Reduce(_SCALAR, _Reduce(os.system, f"touch {marker}"), b"\x01"),
       f"global {os.system.__module__}.system is not allowed"),
      (_Reduce(_RECONSTRUCT, list, (0,), b"b"), "numpy _reconstruct with unexpected arguments"),
  ]
  path = tmp_path / "evil.bin"
  for attack, match in attacks:
    path.write_bytes(pickle.dumps(([attack, b"b"], [True]), protocol=2))
    with pytest.raises(UserError, match=r"evil\.bin: .*" + match):
      verification_bin.load_verification_bin(str(path))
  # A hand-made state claiming more data than it holds.
  fine = pickle.dumps(([np.zeros(3, np.uint8), b"b"], [True]), protocol=2)
  path.write_bytes(fine.replace(b"K\x03\x85", b"K\x09\x85", 1))
  with pytest.raises(UserError, match=r"numpy array of shape \(9,\) and dtype \|u1 with 3 "
                     r"bytes"):
    verification_bin.load_verification_bin(str(path))
  assert not marker.exists()


class _Evil:

  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return (os.system, (f"touch {self.target}",))


class _EvilEval:

  def __reduce__(self):
    return (eval, ("1+1",))


@pytest.mark.parametrize("make", [
    lambda t: _Evil(t),
    lambda t: ([b"a", _Evil(t)], [True]),
    lambda t: ([b"a", b"b"], [_Evil(t)]),
    lambda t: ([_EvilEval(), b"b"], [True]),
])
def test_bin_refuses_malicious_pickle(tmp_path, make):
  target = tmp_path / "pwned"
  path = tmp_path / "evil.bin"
  for protocol in (0, 2, 4):
    path.write_bytes(pickle.dumps(make(target), protocol=protocol))
    with pytest.raises(UserError, match=r"evil\.bin: refused to load: global .* not allowed"):
      verification_bin.load_verification_bin(str(path))
  assert not target.exists()


@pytest.mark.parametrize("obj,match", [
    ([np.zeros(4, np.float32)], r"numpy dtype .f4"),
    ([np.zeros(2, dtype=[("a", "u1")])], r"numpy dtype .V1"),
    ([np.array([b"a"], dtype=object)], r"numpy dtype .O"),
])
def test_bin_refuses_other_numpy(tmp_path, obj, match):
  path = str(tmp_path / "np.bin")
  fx.write_bin_fixture(path, obj + [b"x"], [True], protocol=2)
  with pytest.raises(UserError, match=r"np\.bin: refused to load: " + match):
    verification_bin.load_verification_bin(path)


def test_bin_bad_files(tmp_path):
  path = tmp_path / "b.bin"
  good = pickle.dumps(([b"a", b"b"], [True]), protocol=4)
  path.write_bytes(good[:-5])
  with pytest.raises(UserError, match=r"b\.bin: not a readable pickle"):
    verification_bin.load_verification_bin(str(path))
  path.write_bytes(b"\xff\xd8 not a pickle at all")
  with pytest.raises(UserError, match=r"b\.bin: not a readable pickle"):
    verification_bin.load_verification_bin(str(path))
  path.write_bytes(pickle.dumps({"a": 1}))
  with pytest.raises(UserError, match=r"b\.bin: holds a dict; expected"):
    verification_bin.load_verification_bin(str(path))
  path.write_bytes(pickle.dumps(([b"a", b"b", b"c"], [True])))
  with pytest.raises(UserError, match=r"b\.bin: 3 images for 1 pairs"):
    verification_bin.load_verification_bin(str(path))
  path.write_bytes(pickle.dumps(([b"a", "text"], [True])))
  with pytest.raises(UserError, match=r"b\.bin: image 1 is a str"):
    verification_bin.load_verification_bin(str(path))
  path.write_bytes(pickle.dumps(([b"a", b"b"], [2])))
  with pytest.raises(UserError, match=r"b\.bin: issame\[0\] is 2"):
    verification_bin.load_verification_bin(str(path))
  with pytest.raises(UserError, match=r"missing\.bin: verification \.bin does not exist"):
    verification_bin.load_verification_bin(str(tmp_path / "missing.bin"))


# ----- RecordIO -----

def _identities():
  return [[fx.jpeg_bytes(1), fx.jpeg_bytes(2)], [fx.png_bytes(3)],
          [fx.jpeg_with_magic(4), fx.jpeg_bytes(5), fx.jpeg_bytes(6)]]


def test_recordio_reads_independent_fixture(tmp_path):
  rec = str(tmp_path / "train.rec")
  ids = _identities()
  fx.write_rec_fixture(rec, ids)
  # The fixture really holds a multi-part record (continuation flag 1 on image key 4).
  with open(rec, "rb") as f:
    f.seek(fx.rec_offsets(rec)[4])
    assert struct.unpack("<II", f.read(8))[1] >> 29 == 1
  with face_pack.FaceRecordIOReader(rec) as reader:
    assert reader.has_header
    assert reader.index.summary() == {"groups": {}, "images": 6, "identities": 3}
    assert reader.index.identity_image_counts == (2, 1, 3)
    records = list(reader)
  assert [(r.identity, r.image) for r in records] == [
      (j, img) for j, imgs in enumerate(ids) for img in imgs]
  assert records[3].source == f"{rec}#4"
  decode_image(records[3].image, records[3].source)
  with RecordIOReader(rec) as raw:
    assert len(list(raw)) == 1 + 6 + 3
    assert raw.keys.tolist() == list(range(10))


def test_recordio_without_header(tmp_path):
  rec = str(tmp_path / "flat.rec")
  ids = [[fx.jpeg_bytes(1)], [fx.jpeg_bytes(2), fx.jpeg_bytes(3)]]
  fx.write_rec_fixture(rec, ids, header=False)
  with face_pack.FaceRecordIOReader(rec) as reader:
    assert not reader.has_header
    assert reader.index.identity_image_counts == (1, 2)
    assert [(r.identity, r.image) for r in reader] == [(0, ids[0][0]), (1, ids[1][0]),
                                                      (1, ids[1][1])]


def test_recordio_writer_matches_independent_bytes(tmp_path):
  ids = _identities()
  fx.write_rec_fixture(str(tmp_path / "a.rec"), ids)
  writer = face_pack.FaceRecordIOWriter(str(tmp_path / "b.rec"), str(tmp_path / "b.idx"))
  for j, imgs in enumerate(ids):
    for img in imgs:
      writer.add(img, j)
  assert writer.finish() == {"images": 6, "identities": 3}
  for ext in (".rec", ".idx"):
    assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes()


def test_encode_record_multipart_round_trip(tmp_path):
  magic = struct.pack("<I", codec.MAGIC)
  payloads = [b"", b"abc", magic, b"abcd" + magic + magic + b"xy", b"a" + magic + b"bcd",
              magic + b"\x00" * 3]
  path = str(tmp_path / "raw.rec")
  with RecordIOWriter(path, str(tmp_path / "raw.idx")) as w:
    for k, p in enumerate(payloads):
      w.write(p, key=k)
  with RecordIOReader(path) as r:
    assert [p for _, p in r] == payloads
    assert [r.read(k) for k in range(len(payloads))] == payloads
  assert codec.encode_record(b"abcd" + magic + b"x") == (
      struct.pack("<II", codec.MAGIC, (1 << 29) | 4) + b"abcd" +
      struct.pack("<II", codec.MAGIC, (3 << 29) | 1) + b"x\x00\x00\x00")


def _corrupt(path, offset, data):
  with open(path, "r+b") as f:
    f.seek(offset)
    f.write(data)


def _rec_error(rec, match, **kw):
  with pytest.raises(UserError, match=match):
    with face_pack.FaceRecordIOReader(rec, **kw) as reader:
      list(reader)


def test_recordio_bad_magic_and_length(tmp_path):
  rec = str(tmp_path / "train.rec")
  fx.write_rec_fixture(rec, _identities())
  off = fx.rec_offsets(rec)
  _corrupt(rec, off[2], b"\x00\x00\x00\x00")
  _rec_error(rec, r"train\.rec: record 2 at byte \d+ .*expected RecordIO magic 0xced7230a")
  fx.write_rec_fixture(rec, _identities())
  length = off[3] - off[2] - 8
  _corrupt(rec, off[2] + 4, struct.pack("<I", length + 8))
  _rec_error(rec, r"record 2 at byte .*length field is wrong")
  _corrupt(rec, off[2] + 4, struct.pack("<I", 10**8))
  _rec_error(rec, r"record 2 .*length field says 100000000 bytes .*truncated or the length")
  fx.write_rec_fixture(rec, _identities())
  with open(rec, "r+b") as f:
    f.truncate(off[5] + 20)
  _rec_error(rec, r"train\.idx:7: record 6 at byte \d+ lies past the end of .*train\.rec "
             r"\(\d+ bytes\); the \.rec is truncated")
  fx.write_rec_fixture(rec, _identities())
  with open(rec, "r+b") as f:
    f.truncate(os.path.getsize(rec) - 4)
  _rec_error(rec, r"train\.rec: record 9 at byte \d+ .*only \d+ remain; the \.rec is truncated")


def test_recordio_idx_disagrees(tmp_path):
  rec = str(tmp_path / "train.rec")
  idx = str(tmp_path / "train.idx")
  fx.write_rec_fixture(rec, _identities())
  lines = open(idx).read().splitlines()
  k, o = lines[3].split("\t")
  open(idx, "w").write("\n".join(lines[:3] + [f"{k}\t{int(o) + 8}"] + lines[4:]) + "\n")
  _rec_error(rec, r"record 3 at byte \d+ \(from .*train\.idx line 4\): expected RecordIO "
             r"magic .*expected the \.idx written with this \.rec")
  open(idx, "w").write("\n".join(lines[:3] + [f"{k}\t{10**9}"] + lines[4:]) + "\n")
  _rec_error(rec, r"train\.idx:4: record 3 at byte 1000000000 lies past the end")
  open(idx, "w").write("\n".join(lines[:3] + [f"{k}\t{int(o) + 2}"] + lines[4:]) + "\n")
  _rec_error(rec, r"train\.idx:4: record 3 at byte \d+ is not 4-byte aligned")
  open(idx, "w").write("\n".join(lines[:3] + ["3 x"] + lines[4:]) + "\n")
  _rec_error(rec, r"train\.idx:4: cannot parse")
  open(idx, "w").write("\n".join(lines[:3] + [lines[2]] + lines[4:]) + "\n")
  _rec_error(rec, r"train\.idx: key 2 appears on more than one line")
  open(idx, "w").write("\n".join(lines[:3] + lines[4:]) + "\n")
  _rec_error(rec, r"train\.idx: no record with key 3")
  os.remove(idx)
  _rec_error(rec, r"train\.rec: no \.idx file next to it")
  _rec_error(str(tmp_path / "none.rec"), r"none\.rec: RecordIO file does not exist")


def test_recordio_label_disagrees_with_identity_range(tmp_path):
  rec = str(tmp_path / "train.rec")
  fx.write_rec_fixture(rec, _identities(), image_label_override={5: 0})
  _rec_error(rec, r"train\.rec#5: image label 0 disagrees with identity record 2",
             strict_identity_records=True)


def _glint_like(tmp_path):
  """A pack whose identity ranges hold images labeled as other identities (as Glint360K).

  Returns (rec, [(image, own label)] in key order).
  """
  rec = str(tmp_path / "glint.rec")
  ids = [[fx.jpeg_bytes(10 + k) for k in range(n)] for n in (3, 2, 1, 3)]
  # Keys: identity 0 -> 1..3, 1 -> 4..5, 2 -> 6, 3 -> 7..9. Three images say otherwise.
  override = {2: 3, 5: 0, 8: 1}
  written = fx.write_rec_fixture(rec, ids, image_label_override=override)
  images = [img for imgs in ids for img in imgs]
  return rec, [(img, override.get(key, label)) for img, (key, label) in zip(images, written)]


def test_recordio_images_keep_their_own_labels_glint_like(tmp_path):
  rec, expected = _glint_like(tmp_path)
  said = []
  reader = face_pack.FaceRecordIOReader(rec, warn=said.append)
  with reader:
    records = list(reader)
    assert [(r.image, r.identity) for r in records] == expected
    labels = [label for _, label in expected]
    assert reader.index.identity_image_counts == tuple(
        labels.count(j) for j in range(4))  # (3, 3, 1, 2)
    assert reader.identity_record_disagreements == 3
    assert reader.malformed_identity_records == 0
  (warning,) = said
  assert reader.identity_record_warning == warning
  assert warning.startswith(f"{rec}: 3 of 9 images carry a label other than the identity "
                                 "record whose key range holds them (first: key 2 has label 3")
  assert "--strict_identity_records" in warning
  _rec_error(rec, r"glint\.rec#2: image label 3 disagrees with identity record 0 whose key "
             "range holds it", strict_identity_records=True)


def test_recordio_merged_pack_with_scalar_identity_records(tmp_path):
  rec = str(tmp_path / "merged.rec")
  ids = [[fx.jpeg_bytes(20)], [fx.jpeg_bytes(21), fx.png_bytes(22)], [fx.jpeg_bytes(23)]]
  fx.write_rec_fixture(rec, ids, identity_records="scalar")
  said = []
  reader = face_pack.FaceRecordIOReader(rec, warn=said.append)
  assert len(said) == 1 and re.search(r"4 of 4 images .* and 3 of 3 identity records hold no "
                                      r"\(first key, end key\) range", said[0])
  with reader:
    assert [(r.image, r.identity) for r in reader] == [
        (img, j) for j, imgs in enumerate(ids) for img in imgs]
    assert reader.index.identity_image_counts == (1, 2, 1)
    assert (reader.identity_record_disagreements, reader.malformed_identity_records) == (4, 3)
  _rec_error(rec, r"merged\.rec#5: identity record has flag 0; expected a \(first image key, "
             r"end key\) label with flag 2", strict_identity_records=True)


def test_recordio_consistent_pack_warns_nothing(tmp_path):
  rec = str(tmp_path / "train.rec")
  fx.write_rec_fixture(rec, _identities())
  said = []
  for strict in (False, True):
    with face_pack.FaceRecordIOReader(rec, strict_identity_records=strict,
                                     warn=said.append) as reader:
      assert reader.identity_record_disagreements == 0
      assert reader.identity_record_warning is None
      assert [r.identity for r in reader] == [0, 0, 1, 2, 2, 2]
  assert not said


def test_recordio_bad_ranges_are_counted_or_refused(tmp_path):
  rec = str(tmp_path / "train.rec")
  fx.write_rec_fixture(rec, _identities())
  # Identity record 1 (key 8) claims keys [4, 5) instead of [3, 4): key 3 is in no range,
  # key 4 in two; their own labels (1 and 2) are used.
  _corrupt(rec, fx.rec_offsets(rec)[8] + 8 + 24, struct.pack("<ff", 4, 5))
  said = []
  reader = face_pack.FaceRecordIOReader(rec, warn=said.append)
  assert len(said) == 1 and re.search(r"2 of 6 images .*first: key 3 has label 1, in no "
                                      r"single identity record's range", said[0])
  with reader:
    assert [r.identity for r in reader] == [0, 0, 1, 2, 2, 2]
    assert reader.index.identity_image_counts == (2, 1, 3)


def test_recordio_label_vectors_and_bad_labels(tmp_path):
  # Image headers with flag > 0 carry a label vector; insightface uses its first value.
  rec, idx = str(tmp_path / "vec.rec"), str(tmp_path / "vec.idx")
  images = [fx.jpeg_bytes(50), fx.jpeg_bytes(51), fx.jpeg_bytes(52)]
  labels = [1.0, 0.0, 1.0]

  def write(bad_label=None):
    payloads = [fx._ir_payload(2, 0.0, 0, labels=(4, 6))]
    for k, (img, label) in enumerate(zip(images, labels)):
      label = bad_label if bad_label is not None and k == 2 else label
      payloads.append(fx._ir_payload(2, 0.0, k + 1, labels=(label, 0.25), image=img))
    payloads += [fx._ir_payload(2, 0.0, 0, labels=(2, 3)),
                 fx._ir_payload(2, 0.0, 0, labels=(1, 2))]
    with RecordIOWriter(rec, idx) as w:
      for key, payload in enumerate(payloads):
        w.write(payload, key=key)

  write()
  # Identity records (out of order) cover keys 2 and 1 only: key 3 is in no range.
  said = []
  reader = face_pack.FaceRecordIOReader(rec, warn=said.append)
  assert len(said) == 1 and re.search(r"1 of 3 images .*key 3 has label 1, in no single",
                                      said[0])
  with reader:
    assert [(r.image, r.identity) for r in reader] == list(zip(images, [1, 0, 1]))
    assert reader.index.identity_image_counts == (1, 2)
  for bad, shown in ((-1.0, "-1.0"), (float("nan"), "nan"), (2.5, "2.5")):
    write(bad)
    _rec_error(rec, rf"vec\.rec#3: label {shown}; expected a non-negative integer")
  write(3e9)  # Would overflow the labels, or allocate counts for 3e9 identities.
  _rec_error(rec, r"vec\.rec#3: label 3000000000; expected an identity label below 16777216")


def test_head_reads_match_full_reads(tmp_path):
  rec = str(tmp_path / "train.rec")
  fx.write_rec_fixture(rec, _identities())
  with RecordIOReader(rec) as raw:
    for key in raw.keys.tolist():
      full = raw.read(key)
      for size in (0, 5, 32, 10**6):
        assert raw.read_head(key, size) == full[:size], (key, size)


def test_recordio_corrupt_image_skipped_or_raised(tmp_path):
  rec = str(tmp_path / "train.rec")
  ids = _identities()
  ids[1] = [fx.jpeg_bytes(3)[:100]]
  fx.write_rec_fixture(rec, ids)
  _rec_error(rec, r"train\.rec#3: not a decodable JPEG/PNG")
  with face_pack.FaceRecordIOReader(rec, skip_corrupt=True) as reader:
    assert [r.identity for r in reader] == [0, 0, 2, 2, 2]
    assert [s for s, _ in reader.skipped] == [f"{rec}#3"]


def test_recordio_bad_header(tmp_path):
  rec = str(tmp_path / "train.rec")
  fx.write_rec_fixture(rec, _identities())
  off = fx.rec_offsets(rec)
  # Identity record 1 (key 8) claims keys [4, 5) instead of [3, 4).
  _corrupt(rec, off[8] + 8 + 24, struct.pack("<ff", 4, 5))
  _rec_error(rec, r"train\.rec#8: identity 1 covers image keys \[4, 5\); expected a range "
             r"starting at 3", strict_identity_records=True)
  _corrupt(rec, off[0] + 8 + 24, struct.pack("<ff", 7, 6))
  for strict in (False, True):
    _rec_error(rec, r"train\.rec#0: header label \(7, 6\)", strict_identity_records=strict)
