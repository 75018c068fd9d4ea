"""Built-in synthetic demographic face data set (the default data of every config).

Why it exists: the MST-KD recipe (specialized teachers -> adaptor -> student -> per-group
verification) must run end to end with no download. The data set therefore reproduces the
phenomenon the method is about: identities of different demographic groups differ from
each other along *different* visual factors, so a model trained on one group learns
features that separate that group's identities well and other groups' identities less
well, and a model trained on mixed data can be biased.

What it models:
  * Procedurally rendered RGB face-like images (default 32x32, any size 16..112): head
    ellipse with a tapered jaw, ears, hair with a hairline, eyes with irises, eyebrows,
    nose shading, a curved mouth, cheek blush, beard shading, a mole, and a periodic skin
    texture. Everything is drawn with soft edges from 35 continuous attributes.
  * G groups (`group_a`, `group_b`, ...), I identities per group, K images per identity.
  * Group-level appearance: each group has its own mean skin and hair colour and mean
    attribute values (head shape, feature placement).
  * Group-specific identity factors: from the seed, each group is assigned its own small
    set of shape, colour and texture attributes (e.g. eye spacing, jaw taper, hair colour,
    texture frequency) along which its identities vary strongly. Group windows are cut from
    one seed-level permutation of the attributes, so up to four groups use disjoint sets;
    further groups overlap partially with earlier ones.
  * Shared identity factors: a few attributes along which identities of every group vary
    (a smaller part of the identity variation), plus weak identity variation in all other
    attributes so that identity is never exactly low-dimensional.
  * Nuisance per image: pose (shift, scale, in-plane rotation), expression (mouth curve,
    brow tilt, eye opening), illumination (brightness, linear gradient, colour cast),
    background colour, blur, pixel noise, and a random occluding patch.
  * Per-group difficulty: `difficulty[g]` multiplies every nuisance amplitude (and the
    occlusion probability) of group g, all but the background colour; identity variation
    is unchanged, so difficulty is the ratio of nuisance to identity variation. The
    default (0.85 .. 1.2) gives the groups somewhat different difficulties.
  * Evaluation (test) sets per group with identities disjoint from training, and RFW-style
    verification pairs (half same identity, interleaved same/different so that any
    contiguous fold of even size is balanced).
  * Optional held-out validation sets per group (`validation_identities_per_group`,
    `validation_pairs_per_group`; 0 = none): yet other new identities of the same group
    model, with their own pairs drawn like the test pairs. Checkpoint selection uses these,
    never the test pairs. They come from their own random streams, so asking for them
    leaves the training and test arrays bit-identical to those of the spec without them.

What it does not model: real face geometry or 3-D pose (out-of-plane rotation), age,
accessories, real skin reflectance, the long-tailed identity sizes of web-scraped data,
label noise, or any real demographic group. Group names are neutral letters: the groups
are abstract distributions, not stand-ins for real populations, and results on them say
nothing about real-world bias.

Check of the phenomenon (tests/test_synthetic.py, default spec, seeds 0..5): a Fisher LDA
fitted to one group's training pixels verifies that group's evaluation pairs at 0.69-0.86
and the other groups' at 0.54-0.71, on average 0.14-0.17 lower.

Everything is pure numpy, vectorized over images, and deterministic by seed: the same
spec gives bit-identical arrays (on the same numpy version and platform).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import string
from typing import Any

import numpy as np

from mstkd_jax import files
from mstkd_jax.errors import UserError

# Bump when the generator's output for a given spec changes, so stale caches are not used.
FORMAT_VERSION = 1

_MIN_IMAGE_SIZE = 16
_MAX_IMAGE_SIZE = 112
# Images rendered at once; bounds peak memory (~40 float32 [chunk,H,W] maps alive).
_CHUNK = 512

# Attribute table: name -> (category, base value, unit). An attribute's value is
# base + unit * z, where z is the sum of group mean, identity and per-image deviations.
# Categories: 'shape' (geometry), 'colour', 'texture'. Lengths are in face coordinates,
# where the image spans [-1, 1] (one pixel at 32x32 is 0.0625).
_ATTRIBUTES: tuple[tuple[str, str, float, float], ...] = (
    ("face_width", "shape", 0.64, 0.017),
    ("face_length", "shape", 0.8, 0.025),
    ("jaw_taper", "shape", 0.3, 0.12),
    ("face_y", "shape", 0.06, 0.02),
    ("ear_size", "shape", 0.12, 0.035),
    ("hairline", "shape", -0.42, 0.04),
    ("hair_volume", "shape", 0.12, 0.013),
    ("eye_sep", "shape", 0.27, 0.025),
    ("eye_y", "shape", -0.12, 0.02),
    ("eye_size", "shape", 0.1, 0.022),
    ("eye_aspect", "shape", 0.55, 0.2),
    ("brow_gap", "shape", 0.12, 0.033),
    ("brow_thick", "shape", 0.045, 0.025),
    ("brow_tilt", "shape", 0.0, 0.3),
    ("brow_len", "shape", 0.12, 0.05),
    ("nose_len", "shape", 0.25, 0.14),
    ("nose_width", "shape", 0.08, 0.06),
    ("mouth_y", "shape", 0.43, 0.07),
    ("mouth_w", "shape", 0.22, 0.12),
    ("mouth_thick", "shape", 0.05, 0.035),
    ("mouth_curve", "shape", 0.0, 0.8),
    ("skin_lum", "colour", 0.0, 0.045),
    ("skin_warmth", "colour", 0.0, 0.03),
    ("hair_lum", "colour", 0.0, 0.06),
    ("hair_warmth", "colour", 0.0, 0.05),
    ("iris_lum", "colour", 0.25, 0.2),
    ("lip_warmth", "colour", 0.0, 0.15),
    ("cheek_blush", "colour", 0.1, 0.15),
    ("brow_dark", "colour", 0.5, 0.4),
    ("nose_shade", "colour", 0.2, 0.15),
    ("beard", "texture", 0.0, 0.2),
    ("tex_freq", "texture", 4.0, 0.9),
    ("tex_angle", "texture", 0.0, 0.3),
    ("tex_amp", "texture", 0.07, 0.06),
    ("mole_strength", "texture", 0.0, 0.6),
)
_NAMES = tuple(a[0] for a in _ATTRIBUTES)
_INDEX = {name: i for i, name in enumerate(_NAMES)}
_NUM_ATTR = len(_ATTRIBUTES)
_BASE = np.array([a[2] for a in _ATTRIBUTES], np.float64)
_UNIT = np.array([a[3] for a in _ATTRIBUTES], np.float64)
_CATEGORIES = ("shape", "colour", "texture")

# How many attributes of each category form one group's own identity factors, and how
# many form the factors shared by all groups.
_GROUP_FACTORS = {"shape": 4, "colour": 2, "texture": 1}
_SHARED_FACTORS = {"shape": 2, "colour": 1, "texture": 0}
# Identity standard deviations (in attribute units).
_GROUP_FACTOR_STD = (1.2, 1.8)  # range drawn per group factor
_SHARED_FACTOR_STD = 0.7
_BACKGROUND_ID_STD = 0.15
# Spread of group means (in attribute units) around the base values.
_GROUP_MEAN_STD = 0.8

# rng stream keys: np.random.default_rng([seed, key, ...]) gives independent streams.
_KEY_STRUCTURE = 0
_KEY_GROUP = 1
_KEY_TRAIN = 2
_KEY_EVAL = 3
_KEY_PAIRS = 4
_KEY_VALIDATION = 5  # validation identities and images
_KEY_VALIDATION_PAIRS = 6  # validation pairs


def _default_difficulty(num_groups: int) -> tuple[float, ...]:
  """Evenly spaced difficulties 0.85 .. 1.2: groups differ somewhat, none is trivial."""
  if num_groups == 1:
    return (1.0,)
  return tuple(float(round(x, 4)) for x in np.linspace(0.85, 1.2, num_groups))


def _group_name(g: int) -> str:
  """'group_a', ..., 'group_z', then 'group_aa', ... (stays sorted for <= 26 groups)."""
  letters = string.ascii_lowercase
  name = ""
  g += 1
  while g > 0:
    g, r = divmod(g - 1, 26)
    name = letters[r] + name
  return f"group_{name}"


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
  """Returns value as int or raises UserError naming the field."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise UserError(f"SyntheticSpec.{name}: expected an integer, got {value!r}")
  value = int(value)
  if value < minimum or (maximum is not None and value > maximum):
    upper = f" and <= {maximum}" if maximum is not None else ""
    raise UserError(f"SyntheticSpec.{name}: expected an integer >= {minimum}{upper}, "
                    f"got {value}")
  return value


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """What to generate. Validated on construction; `difficulty` is normalized to a tuple.

  Attributes:
    num_groups: number of demographic groups G.
    identities_per_group: training identities per group I.
    images_per_identity: training images per identity K.
    eval_identities_per_group: evaluation (test) identities per group (disjoint from
      training).
    eval_images_per_identity: evaluation images per identity (>= 2); validation identities
      have as many.
    pairs_per_group: verification (test) pairs per group (even; half same identity).
    image_size: square image side in pixels, 16..112.
    difficulty: nuisance multiplier per group; a float (all groups), a sequence of
      num_groups floats, or () for the default ramp 0.85..1.2. After construction it is
      always a tuple of num_groups floats.
    seed: everything is a deterministic function of the spec.
    validation_identities_per_group: held-out validation identities per group, disjoint
      from training and test identities; 0 (the default) = no validation split, else >= 2.
    validation_pairs_per_group: validation pairs per group (even; half same identity);
      0 exactly when validation_identities_per_group is 0.

  Raises:
    UserError: naming the field, for a value of the wrong type or out of range, or pairs
      that the identities and images cannot supply.
  """
  num_groups: int = 4
  identities_per_group: int = 96
  images_per_identity: int = 16
  eval_identities_per_group: int = 48
  eval_images_per_identity: int = 8
  pairs_per_group: int = 600
  image_size: int = 32
  difficulty: tuple[float, ...] | float = ()
  seed: int = 0
  validation_identities_per_group: int = 0
  validation_pairs_per_group: int = 0

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)  # frozen: normalize in place.
    set_("num_groups", _check_int("num_groups", self.num_groups, 1, 702))
    set_("identities_per_group",
         _check_int("identities_per_group", self.identities_per_group, 2))
    set_("images_per_identity",
         _check_int("images_per_identity", self.images_per_identity, 1))
    set_("eval_identities_per_group",
         _check_int("eval_identities_per_group", self.eval_identities_per_group, 2))
    set_("eval_images_per_identity",
         _check_int("eval_images_per_identity", self.eval_images_per_identity, 2))
    set_("pairs_per_group", _check_int("pairs_per_group", self.pairs_per_group, 2))
    set_("image_size",
         _check_int("image_size", self.image_size, _MIN_IMAGE_SIZE, _MAX_IMAGE_SIZE))
    set_("seed", _check_int("seed", self.seed, 0, 2**63 - 1))
    set_("validation_identities_per_group",
         _check_int("validation_identities_per_group",
                    self.validation_identities_per_group, 0))
    set_("validation_pairs_per_group",
         _check_int("validation_pairs_per_group", self.validation_pairs_per_group, 0))
    _check_pairs("pairs_per_group", self.pairs_per_group, "eval_identities_per_group",
                 self.eval_identities_per_group, self.eval_images_per_identity)
    v_ids, v_pairs = self.validation_identities_per_group, self.validation_pairs_per_group
    if (v_ids > 0) != (v_pairs > 0):
      raise UserError(
          f"SyntheticSpec.validation_identities_per_group={v_ids} and "
          f"SyntheticSpec.validation_pairs_per_group={v_pairs}: expected both 0 (no "
          f"validation split) or both > 0")
    if v_ids:
      _check_int("validation_identities_per_group", v_ids, 2)  # Different pairs need 2.
      _check_pairs("validation_pairs_per_group", v_pairs, "validation_identities_per_group",
                   v_ids, self.eval_images_per_identity)
    set_("difficulty", self._normalized_difficulty())

  def _normalized_difficulty(self) -> tuple[float, ...]:
    """Turns the user's difficulty (float, sequence, or ()) into num_groups floats."""
    d = self.difficulty
    if isinstance(d, (list, tuple)) and len(d) == 0:
      return _default_difficulty(self.num_groups)
    if isinstance(d, (int, float, np.integer, np.floating)) and not isinstance(d, bool):
      values = (float(d),) * self.num_groups
    elif isinstance(d, (list, tuple)):
      if len(d) != self.num_groups:
        raise UserError(f"SyntheticSpec.difficulty: expected {self.num_groups} values "
                        f"(one per group) or a single number, got {len(d)}: {d!r}")
      if any(isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating))
             for x in d):
        raise UserError(f"SyntheticSpec.difficulty: expected numbers, got {d!r}")
      values = tuple(float(x) for x in d)
    else:
      raise UserError(f"SyntheticSpec.difficulty: expected a number or a sequence of "
                      f"{self.num_groups} numbers, got {d!r}")
    for x in values:
      if not (math.isfinite(x) and 0.0 <= x <= 4.0):
        raise UserError(f"SyntheticSpec.difficulty: expected values in [0, 4], got {d!r}")
    return values

  @property
  def group_names(self) -> tuple[str, ...]:
    return tuple(_group_name(g) for g in range(self.num_groups))

  @property
  def has_validation(self) -> bool:
    """Whether the spec asks for a held-out validation split."""
    return self.validation_identities_per_group > 0

  def to_json(self) -> str:
    """Canonical JSON of the (normalized) fields; the cache key is derived from it."""
    return json.dumps(dataclasses.asdict(self), sort_keys=True)


def _check_pairs(field: str, pairs: int, ids_field: str, identities: int,
                 per_identity: int) -> None:
  """Raises UserError naming `field` unless `pairs` is even and the identities x images
  hold pairs // 2 distinct same-identity and as many different-identity pairs."""
  if pairs % 2:
    raise UserError(f"SyntheticSpec.{field}: expected an even number (half the pairs are "
                    f"same-identity), got {pairs}")
  half = pairs // 2
  m, k = identities, per_identity
  same_available = m * k * (k - 1) // 2
  diff_available = (m * k) * (m * k - k) // 2
  if half > same_available or half > diff_available:
    raise UserError(
        f"SyntheticSpec.{field}: {pairs} pairs need {half} distinct same-identity pairs, "
        f"but {ids_field}={m} x eval_images_per_identity={k} allow only "
        f"{same_available}; lower {field} or raise those sizes")


@dataclasses.dataclass
class SyntheticFaces:
  """A generated data set.

  Identity labels: group g's training identities are g*I..(g+1)*I-1; evaluation (test)
  identities continue after all training ones (G*I + g*E + e), validation identities after
  all evaluation ones (G*I + G*E + g*V + v), so the three sets are disjoint by label as well
  as by draw. The validation dicts are empty when the spec has no validation split; else
  they have the same keys, shapes and dtypes as the eval ones (V*eval_images_per_identity
  images, validation_pairs_per_group pairs per group).
  """
  spec: SyntheticSpec
  train_images: np.ndarray  # uint8 [N, H, W, 3]
  train_identity: np.ndarray  # int32 [N]
  train_group: np.ndarray  # int32 [N]
  eval_images: dict[str, np.ndarray]  # group -> uint8 [M, H, W, 3]
  eval_identity: dict[str, np.ndarray]  # group -> int32 [M]
  eval_pairs: dict[str, np.ndarray]  # group -> int32 [P, 2], indices into eval_images
  eval_issame: dict[str, np.ndarray]  # group -> bool [P]
  validation_images: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  validation_identity: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  validation_pairs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  validation_issame: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# Structure: which attributes are whose identity factors, group appearance.


@dataclasses.dataclass(frozen=True)
class _GroupModel:
  mean_z: np.ndarray  # [A] group mean offsets in attribute units
  id_std: np.ndarray  # [A] identity standard deviation per attribute
  skin_lum: float  # group skin luminance
  skin_warm: float  # group skin warmth (red up, blue down)
  skin_tint: np.ndarray  # [3] small per-channel tint of the group's skin
  hair_lum: float
  hair_warm: float
  difficulty: float


def _category_permutations(seed: int) -> dict[str, list[int]]:
  """One seed-level permutation of each category's attributes."""
  rng = np.random.default_rng([seed, _KEY_STRUCTURE])
  perms = {}
  for cat in _CATEGORIES:
    idx = [i for i, a in enumerate(_ATTRIBUTES) if a[1] == cat]
    perms[cat] = [idx[j] for j in rng.permutation(len(idx))]
  return perms


def _shared_and_group_attributes(seed: int, g: int) -> tuple[list[int], list[int]]:
  """Shared attributes (same for all groups) and group g's own factor attributes.

  Shared ones are the head of each category's permutation; group g takes the window
  starting at g * size in the rest (wrapping), so the first groups are disjoint.
  """
  perms = _category_permutations(seed)
  shared, own = [], []
  for cat in _CATEGORIES:
    n_shared = _SHARED_FACTORS[cat]
    shared += perms[cat][:n_shared]
    rest = perms[cat][n_shared:]
    size = _GROUP_FACTORS[cat]
    own += [rest[(g * size + j) % len(rest)] for j in range(size)]
  return shared, own


def _group_model(spec: SyntheticSpec, g: int) -> _GroupModel:
  """Group g's appearance and identity factor strengths, from (seed, g) only."""
  rng = np.random.default_rng([spec.seed, _KEY_GROUP, g])
  shared, own = _shared_and_group_attributes(spec.seed, g)
  mean_z = rng.normal(0.0, _GROUP_MEAN_STD, _NUM_ATTR)
  # Colour offsets within a group are identity factors; the group's colour lives in
  # skin_rgb / hair_rgb, so the mean offset of colour attributes stays small.
  for i, a in enumerate(_ATTRIBUTES):
    if a[1] == "colour":
      mean_z[i] *= 0.3
  id_std = np.full(_NUM_ATTR, _BACKGROUND_ID_STD)
  id_std[shared] = _SHARED_FACTOR_STD
  id_std[own] = rng.uniform(*_GROUP_FACTOR_STD, len(own))
  # Group colours: skin and hair luminance and warmth differ between groups.
  return _GroupModel(mean_z=mean_z, id_std=id_std,
                     skin_lum=rng.uniform(0.3, 0.85), skin_warm=rng.uniform(0.05, 0.3),
                     skin_tint=rng.uniform(0.92, 1.0, 3),
                     hair_lum=rng.uniform(0.08, 0.6), hair_warm=rng.uniform(0.0, 0.4),
                     difficulty=spec.difficulty[g])


# ---------------------------------------------------------------------------------------
# Sampling identities and images.


def _sample_identities(model: _GroupModel, n: int, rng: np.random.Generator) -> dict:
  """Identity-level parameters of n identities of one group."""
  z = model.mean_z + rng.standard_normal((n, _NUM_ATTR)) * model.id_std
  return {
      "z": z,
      # Fixed per identity: where the mole sits and the texture's phase. They are part of
      # identity but not a 'factor' (not a continuous direction shared across people).
      "mole_xy": rng.uniform([-0.35, -0.1], [0.35, 0.45], (n, 2)),
      "tex_phase": rng.uniform(0.0, 2 * np.pi, n),
  }


def _sample_images(model: _GroupModel, ids: dict, per_identity: int,
                   rng: np.random.Generator) -> dict:
  """Per-image parameters (identity repeated + nuisance), identity-major order."""
  n_id = ids["z"].shape[0]
  n = n_id * per_identity
  d = model.difficulty
  rep = lambda x: np.repeat(x, per_identity, axis=0)
  z = rep(ids["z"]).copy()
  # Expression: per-image changes of a few identity attributes.
  for name, std in (("mouth_curve", 0.6), ("brow_tilt", 0.5), ("eye_aspect", 0.5),
                    ("mouth_thick", 0.4)):
    z[:, _INDEX[name]] += rng.normal(0.0, std * d, n)
  attr = _BASE + _UNIT * np.clip(z, -3.5, 3.5)
  p = {name: attr[:, i] for i, name in enumerate(_NAMES)}
  p["mole_xy"] = rep(ids["mole_xy"])
  p["tex_phase"] = rep(ids["tex_phase"])
  # Identity colours: the group's luminance and warmth shifted by the identity's colour
  # attributes. Warmth is clipped to a natural range (red >= green >= blue), so skin
  # and hair never turn blue or green whatever the factor strengths.
  def colour(lum, warm):
    warm = np.clip(warm, 0.04, 0.6)[:, None]
    return lum[:, None] * np.concatenate([1.0 + warm, np.ones_like(warm), 1.0 - warm], 1)
  p["skin_rgb"] = model.skin_tint * colour(model.skin_lum * (1.0 + p["skin_lum"]),
                                           model.skin_warm + p["skin_warmth"])
  p["hair_rgb"] = colour(model.hair_lum * np.exp(2.0 * p["hair_lum"]),
                         model.hair_warm + p["hair_warmth"])
  # Nuisance: pose, light, background, blur, noise, occlusion; all scaled by difficulty.
  p["shift"] = rng.normal(0.0, 0.05 * d, (n, 2))
  p["scale"] = np.exp(rng.normal(0.0, 0.05 * d, n))
  p["rotation"] = rng.normal(0.0, 0.07 * d, n)
  p["brightness"] = np.exp(rng.normal(0.0, 0.12 * d, n))
  p["gradient"] = rng.normal(0.0, 0.25 * d, n)
  p["gradient_angle"] = rng.uniform(0.0, 2 * np.pi, n)
  p["colour_cast"] = np.exp(rng.normal(0.0, 0.04 * d, (n, 3)))
  # The background colour is nuisance of constant spread (any colour, as in crops of
  # photographs); it is the one nuisance that difficulty does not scale.
  p["background"] = rng.uniform(0.1, 0.9, (n, 1)) * np.exp(rng.normal(0.0, 0.1, (n, 3)))
  p["blur"] = np.abs(rng.normal(0.0, 0.7 * d, n))  # extra edge width in pixels
  p["noise_std"] = 0.025 * d * rng.uniform(0.5, 1.5, n)
  occluded = rng.random(n) < min(0.95, 0.2 * d)
  centre = rng.uniform(-0.8, 0.8, (n, 2))
  half = rng.uniform(0.1, 0.3, (n, 2))
  # An empty box (lo > hi) marks 'no occlusion' without branching per image.
  p["occ_lo"] = np.where(occluded[:, None], centre - half, 2.0)
  p["occ_hi"] = np.where(occluded[:, None], centre + half, -2.0)
  p["occ_rgb"] = rng.uniform(0.0, 1.0, (n, 3))
  return p


# ---------------------------------------------------------------------------------------
# Rendering.


def _soft(sd: np.ndarray, edge: np.ndarray) -> np.ndarray:
  """Soft inside-mask of a signed distance (negative inside); tanh never overflows."""
  return 0.5 - 0.5 * np.tanh(sd / edge)


def _ellipse_sd(x, y, cx, cy, a, b, angle=None):
  """Approximate signed distance to an (optionally rotated) ellipse, broadcasting."""
  dx, dy = x - cx, y - cy
  if angle is not None:
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = c * dx + s * dy, -s * dx + c * dy
  r = np.sqrt((dx / a) ** 2 + (dy / b) ** 2)
  return (r - 1.0) * np.minimum(a, b)


def _lerp(img, rgb, mask, tmp):
  """Composites colour rgb ([n,3] or [n,H,W,3]) over img in place with a [n,H,W] mask.

  The scratch buffer tmp (img's shape) avoids allocating three full-size [n,H,W,3]
  temporaries per layer.
  """
  if rgb.ndim == 2:
    rgb = rgb[:, None, None, :]
  np.subtract(rgb, img, out=tmp)
  tmp *= mask[..., None]
  img += tmp


def _render(p: dict, size: int, noise_rng: np.random.Generator) -> np.ndarray:
  """Renders images from per-image parameters p (arrays [n, ...]) -> uint8 [n,H,W,3]."""
  f32 = lambda v: np.asarray(v, np.float32)
  col = lambda v: f32(v)[:, None, None]  # [n] -> [n,1,1] for broadcasting over pixels
  n = p["scale"].shape[0]
  pix = 2.0 / size
  grid = (np.arange(size, dtype=np.float32) + 0.5) * pix - 1.0
  gx, gy = grid[None, None, :], grid[None, :, None]
  # Pose: map image coordinates into face coordinates (inverse similarity transform).
  ang, sc = col(p["rotation"]), col(p["scale"])
  dx, dy = gx - col(p["shift"][:, 0]), gy - col(p["shift"][:, 1])
  cos, sin = np.cos(ang), np.sin(ang)
  x = (cos * dx + sin * dy) / sc
  y = (-sin * dx + cos * dy) / sc
  # Edge width in face units: ~0.6 px anti-aliasing plus per-image blur.
  edge = col((0.6 + p["blur"]) * pix / p["scale"])
  a = {k: col(v) for k, v in p.items() if np.ndim(v) == 1}

  img = np.broadcast_to(f32(p["background"])[:, None, None, :],
                        (n, size, size, 3)).copy()
  tmp = np.empty_like(img)
  skin = f32(np.clip(p["skin_rgb"], 0.02, 1.0))
  hair = f32(np.clip(p["hair_rgb"], 0.01, 1.0))

  face_cy = a["face_y"]
  fw, fl = a["face_width"], a["face_length"]
  # Hair behind the head: a bigger ellipse, cut off below ear level.
  hv = a["hair_volume"]
  hair_back = (_soft(_ellipse_sd(x, y, 0.0, face_cy - 0.5 * hv, fw + hv, fl + 0.5 * hv),
                     edge) * _soft(y - (face_cy + 0.15), edge))
  _lerp(img, hair, hair_back, tmp)
  # Ears on both sides.
  es = a["ear_size"]
  ears = np.maximum(
      _soft(_ellipse_sd(x, y, -fw, face_cy - 0.05, 0.6 * es, es), edge),
      _soft(_ellipse_sd(x, y, fw, face_cy - 0.05, 0.6 * es, es), edge))
  _lerp(img, skin * 0.9, ears, tmp)
  # Face: ellipse whose half-width shrinks towards the chin (jaw taper).
  below = np.clip((y - face_cy) / fl, 0.0, 1.0)
  half_w = fw * (1.0 - a["jaw_taper"] * below)
  r = np.sqrt((x / half_w) ** 2 + ((y - face_cy) / fl) ** 2)
  face = _soft((r - 1.0) * half_w, edge)
  # Skin texture: an oriented grating, attenuated by blur like a real low-pass would.
  freq = np.maximum(a["tex_freq"], 0.5) * np.pi / fw  # tex_freq cycles per face width
  ta = a["tex_angle"]
  phase = freq * (np.cos(ta) * x + np.sin(ta) * y) + a["tex_phase"]
  atten = np.exp(-0.5 * (freq * edge) ** 2)
  tex = 1.0 + np.maximum(a["tex_amp"], 0.0) * atten * np.sin(phase)
  # Nose shading and cheek blush modulate the skin before it is composited.
  ey = a["eye_y"]
  nl = np.maximum(a["nose_len"], 0.08)
  nose = _soft(_ellipse_sd(x, y, 0.0, ey + 0.05 + 0.5 * nl, np.maximum(a["nose_width"],
                                                                        0.02), 0.5 * nl),
               edge)
  shade = 1.0 - np.clip(a["nose_shade"], 0.0, 0.5) * nose
  blush_amt = np.clip(a["cheek_blush"], 0.0, 0.4)
  cheeks = (np.exp(-((np.abs(x) - 0.32) ** 2 + (y - 0.15) ** 2) / 0.03))
  skin_px = skin[:, None, None, :] * (tex * shade)[..., None]
  blush_rgb = np.array([0.85, 0.3, 0.35], np.float32)
  skin_px = skin_px + (blush_rgb - skin_px) * (blush_amt * cheeks)[..., None]
  # Beard shading: hair colour over the lower face.
  beard = np.clip(a["beard"], 0.0, 0.8) * _soft(a["mouth_y"] - 0.08 - y, edge) * face
  _lerp(img, skin_px, face, tmp)
  _lerp(img, hair, beard, tmp)
  # Mole: a dark gaussian spot at an identity-fixed place.
  mole_amt = np.clip(a["mole_strength"], 0.0, 0.9)
  mx, my = col(p["mole_xy"][:, 0]), col(p["mole_xy"][:, 1])
  mole = mole_amt * np.exp(-((x - mx) ** 2 + (y - my) ** 2) / (2 * 0.05 ** 2)) * face
  img *= (1.0 - mole)[..., None]
  # Hair fringe over the forehead down to the (curved) hairline.
  fringe = face * _soft(y - (a["hairline"] + 0.3 * x ** 2), edge)
  _lerp(img, hair, fringe, tmp)
  # Eyebrows and eyes (mirrored), sclera then iris.
  sep = a["eye_sep"]
  esz = np.maximum(a["eye_size"], 0.03)
  eh = esz * np.clip(a["eye_aspect"], 0.2, 1.2)
  brow_rgb = hair * (1.0 - np.clip(f32(p["brow_dark"]), 0.0, 0.9))[:, None]
  iris_v = np.clip(f32(p["iris_lum"]), 0.02, 0.8)
  iris_rgb = np.stack([iris_v * 0.9, iris_v * 0.75, iris_v * 0.6], axis=1)
  sclera_rgb = np.full((n, 3), 0.92, np.float32)
  for side in (-1.0, 1.0):
    brow = _soft(_ellipse_sd(x, y, side * sep, ey - a["brow_gap"],
                             np.maximum(a["brow_len"], 0.04),
                             np.maximum(a["brow_thick"], 0.012), side * a["brow_tilt"]),
                 edge)
    _lerp(img, brow_rgb, brow, tmp)
    eye = _soft(_ellipse_sd(x, y, side * sep, ey, esz, eh), edge)
    _lerp(img, sclera_rgb, eye, tmp)
    iris = _soft(_ellipse_sd(x, y, side * sep, ey, 0.55 * esz, 0.55 * esz), edge) * eye
    _lerp(img, iris_rgb, iris, tmp)
  # Mouth: an ellipse bent by the curve attribute (smile / frown).
  lip_w = np.clip(f32(p["lip_warmth"]), -0.3, 0.3)[:, None]
  lip_rgb = np.clip(skin * 0.7 + lip_w * np.array([1.0, -0.5, -0.5], np.float32)
                    + np.array([0.12, -0.02, -0.02], np.float32), 0.0, 1.0)
  ym = y - a["mouth_y"] - a["mouth_curve"] * x ** 2
  mouth = _soft(_ellipse_sd(x, ym, 0.0, 0.0, np.maximum(a["mouth_w"], 0.05),
                            np.maximum(a["mouth_thick"], 0.015)), edge)
  _lerp(img, lip_rgb, mouth, tmp)
  # Illumination: brightness times a linear gradient in image coordinates, colour cast.
  ga = col(p["gradient_angle"])
  light = col(p["brightness"]) * (1.0 + col(p["gradient"]) * 0.5 *
                                  (np.cos(ga) * gx + np.sin(ga) * gy))
  img = img * light[..., None] * f32(p["colour_cast"])[:, None, None, :]
  # Occlusion: an axis-aligned patch in image coordinates (in front of everything).
  lo, hi = f32(p["occ_lo"]), f32(p["occ_hi"])
  occ = ((gx >= lo[:, 0, None, None]) & (gx <= hi[:, 0, None, None])
         & (gy >= lo[:, 1, None, None]) & (gy <= hi[:, 1, None, None]))
  img = np.where(occ[..., None], f32(p["occ_rgb"])[:, None, None, :], img)
  # Sensor noise.
  img = img + noise_rng.standard_normal(img.shape, dtype=np.float32) * col(
      p["noise_std"])[..., None]
  return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _render_all(p: dict, size: int, noise_rng: np.random.Generator) -> np.ndarray:
  """Renders in chunks of _CHUNK images (fixed chunking keeps noise deterministic)."""
  n = p["scale"].shape[0]
  out = np.empty((n, size, size, 3), np.uint8)
  for start in range(0, n, _CHUNK):
    part = {k: v[start:start + _CHUNK] for k, v in p.items()}
    out[start:start + _CHUNK] = _render(part, size, noise_rng)
  return out


# ---------------------------------------------------------------------------------------
# Pairs.


def _draw_pairs(identity: np.ndarray, num_pairs: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Half same-identity, half different-identity pairs, no duplicates, interleaved.

  Pairs are stored with the smaller index first. Same pairs are drawn without replacement
  from all same-identity pairs (two different images); different pairs by rejection.
  """
  half = num_pairs // 2
  m = identity.shape[0]
  # All same-identity pairs (i < j): few enough to enumerate (identities x K^2 / 2).
  same_all = []
  for ident in np.unique(identity):
    idx = np.sort(np.nonzero(identity == ident)[0])
    ii, jj = np.triu_indices(idx.shape[0], k=1)
    same_all.append(np.stack([idx[ii], idx[jj]], axis=1))
  same_all = np.concatenate(same_all)
  same = same_all[np.sort(rng.choice(same_all.shape[0], half, replace=False))]
  # Different pairs: draw batches, keep new distinct cross-identity pairs in draw order.
  chosen: list[np.ndarray] = []
  seen: set[tuple[int, int]] = set()
  while len(seen) < half:
    cand = rng.integers(0, m, (2 * half + 16, 2))
    cand.sort(axis=1)
    cand = cand[identity[cand[:, 0]] != identity[cand[:, 1]]]
    for i, j in cand.tolist():
      if (i, j) not in seen:
        seen.add((i, j))
        chosen.append(np.array([i, j]))
        if len(seen) == half:
          break
  diff = np.stack(chosen)
  # Shuffle each kind, then alternate same/different: every even-sized contiguous block
  # (e.g. the 10 folds of the verification protocol) is balanced.
  same = same[rng.permutation(half)]
  diff = diff[rng.permutation(half)]
  pairs = np.empty((2 * half, 2), np.int32)
  pairs[0::2], pairs[1::2] = same, diff
  issame = np.zeros(2 * half, bool)
  issame[0::2] = True
  return pairs, issame


# ---------------------------------------------------------------------------------------
# Public API.

# The per-group arrays of a pair set, by field suffix (eval_images, validation_images, ...).
_PAIR_SET_FIELDS = ("images", "identity", "pairs", "issame")


def _splits(spec: SyntheticSpec) -> tuple[str, ...]:
  """The prefixes of spec's per-group pair sets: eval, and validation when it has one."""
  return ("eval", "validation") if spec.has_validation else ("eval",)


def _split(spec: SyntheticSpec, model: _GroupModel, key: int, g: int, identities: int,
           per_identity: int, first_label: int) -> tuple[np.ndarray, np.ndarray]:
  """One group's split: `identities` new identities x `per_identity` images.

  Everything is drawn from the stream (seed, key, g) alone, so a split never shifts
  another's draws. Returns (uint8 [identities*per_identity, S, S, 3], int32 labels
  first_label.. in identity-major order).
  """
  rng = np.random.default_rng([spec.seed, key, g])
  ids = _sample_identities(model, identities, rng)
  params = _sample_images(model, ids, per_identity, rng)
  images = _render_all(params, spec.image_size, rng)
  labels = np.repeat(np.arange(first_label, first_label + identities, dtype=np.int32),
                     per_identity)
  return images, labels


def generate(spec: SyntheticSpec) -> SyntheticFaces:
  """Generates the data set described by spec (deterministic).

  Raises:
    UserError: spec is not a SyntheticSpec.
  """
  if not isinstance(spec, SyntheticSpec):
    raise UserError(f"generate: expected a SyntheticSpec, got {type(spec).__name__}")
  G, I, K = spec.num_groups, spec.identities_per_group, spec.images_per_identity
  E, KE = spec.eval_identities_per_group, spec.eval_images_per_identity
  V = spec.validation_identities_per_group
  train_images, train_identity, train_group = [], [], []
  # Per-group pair sets: {"eval_images": {group: array}, ..., "validation_issame": ...}.
  sets = {f"{split}_{field}": {} for split in _splits(spec) for field in _PAIR_SET_FIELDS}
  for g, name in enumerate(spec.group_names):
    model = _group_model(spec, g)
    # Training split.
    images, labels = _split(spec, model, _KEY_TRAIN, g, I, K, g * I)
    train_images.append(images)
    train_identity.append(labels)
    train_group.append(np.full(I * K, g, np.int32))
    # Evaluation (test) split: new identities from the same group distribution.
    images, labels = _split(spec, model, _KEY_EVAL, g, E, KE, G * I + g * E)
    pairs, issame = _draw_pairs(labels, spec.pairs_per_group,
                                np.random.default_rng([spec.seed, _KEY_PAIRS, g]))
    for field, value in zip(_PAIR_SET_FIELDS, (images, labels, pairs, issame)):
      sets[f"eval_{field}"][name] = value
    # Validation split: yet other new identities, from streams of its own.
    if V:
      images, labels = _split(spec, model, _KEY_VALIDATION, g, V, KE, G * I + G * E + g * V)
      pairs, issame = _draw_pairs(
          labels, spec.validation_pairs_per_group,
          np.random.default_rng([spec.seed, _KEY_VALIDATION_PAIRS, g]))
      for field, value in zip(_PAIR_SET_FIELDS, (images, labels, pairs, issame)):
        sets[f"validation_{field}"][name] = value
  return SyntheticFaces(
      spec=spec,
      train_images=np.concatenate(train_images),
      train_identity=np.concatenate(train_identity),
      train_group=np.concatenate(train_group),
      **sets)


def cache_path(spec: SyntheticSpec, data_dir: str | os.PathLike) -> str:
  """The cache file of spec under data_dir: synthetic_v<format>_<spec hash>.npz."""
  key = f"{FORMAT_VERSION}:{spec.to_json()}".encode()
  digest = hashlib.sha256(key).hexdigest()[:16]
  return os.path.join(os.fspath(data_dir), f"synthetic_v{FORMAT_VERSION}_{digest}.npz")


def _to_arrays(faces: SyntheticFaces) -> dict[str, np.ndarray]:
  arrays = {
      "format_version": np.array(FORMAT_VERSION, np.int64),
      "spec_json": np.array(faces.spec.to_json()),
      "train_images": faces.train_images,
      "train_identity": faces.train_identity,
      "train_group": faces.train_group,
  }
  for split in _splits(faces.spec):
    for name in faces.spec.group_names:
      for field in _PAIR_SET_FIELDS:
        arrays[f"{split}_{field}/{name}"] = getattr(faces, f"{split}_{field}")[name]
  return arrays


def _check_loaded(faces: SyntheticFaces) -> None:
  """Raises ValueError if the loaded arrays do not have the shapes the spec implies."""
  s = faces.spec
  n = s.num_groups * s.identities_per_group * s.images_per_identity
  hw = (s.image_size, s.image_size, 3)
  checks = [
      (faces.train_images, (n,) + hw, np.uint8),
      (faces.train_identity, (n,), np.int32),
      (faces.train_group, (n,), np.int32),
  ]
  sizes = {"eval": (s.eval_identities_per_group, s.pairs_per_group),
           "validation": (s.validation_identities_per_group, s.validation_pairs_per_group)}
  for split in _splits(s):
    identities, p = sizes[split]
    m = identities * s.eval_images_per_identity
    for name in s.group_names:
      checks += [
          (getattr(faces, f"{split}_images")[name], (m,) + hw, np.uint8),
          (getattr(faces, f"{split}_identity")[name], (m,), np.int32),
          (getattr(faces, f"{split}_pairs")[name], (p, 2), np.int32),
          (getattr(faces, f"{split}_issame")[name], (p,), np.bool_),
      ]
  for arr, shape, dtype in checks:
    if arr.shape != shape or arr.dtype != dtype:
      raise ValueError(f"array of shape {arr.shape} {arr.dtype}, expected {shape} "
                       f"{np.dtype(dtype)}")


def _load(path: str, spec: SyntheticSpec) -> SyntheticFaces:
  """Reads a cache file; raises UserError (naming it) if it is unreadable or foreign."""
  try:
    with np.load(path, allow_pickle=False) as z:
      version = int(z["format_version"])
      stored = str(z["spec_json"])
      if version != FORMAT_VERSION or stored != spec.to_json():
        raise ValueError(f"it holds format {version} of spec {stored}, expected format "
                         f"{FORMAT_VERSION} of spec {spec.to_json()}")
      faces = SyntheticFaces(
          spec=spec,
          train_images=z["train_images"],
          train_identity=z["train_identity"],
          train_group=z["train_group"],
          **{f"{split}_{field}": {g: z[f"{split}_{field}/{g}"] for g in spec.group_names}
             for split in _splits(spec) for field in _PAIR_SET_FIELDS})
    _check_loaded(faces)
    return faces
  except Exception as e:  # Any failure to read means the file is not a valid cache.
    raise UserError(f"synthetic data cache {path} is unreadable or does not match its "
                    f"spec ({type(e).__name__}: {e}); delete the file and it will be "
                    f"generated again") from e


def load_or_generate(spec: SyntheticSpec, data_dir: str | os.PathLike) -> SyntheticFaces:
  """Loads spec's data set from its cache file under data_dir, generating it once.

  The file is written atomically (`files.save_npz`: a unique temporary name in data_dir,
  renamed into place when complete), so a file with the final name is always complete and
  concurrent callers never share a temporary file; their contents are identical. A
  final-name file that cannot be read is never overwritten silently: UserError names it and
  asks to delete it. A data_dir that cannot be written (disk full, no permission, a
  read-only file system) is one UserError naming the file and the OS error.
  """
  data_dir = os.fspath(data_dir)
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise UserError(f"data_dir {data_dir}: expected a directory, found a file")
  path = cache_path(spec, data_dir)
  if os.path.exists(path):
    return _load(path, spec)
  faces = generate(spec)
  try:
    os.makedirs(data_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f"data_dir {data_dir}: cannot write the synthetic data cache there "
                    f"({files.os_error_reason(e)})") from e
  files.save_npz(path, _to_arrays(faces))
  return faces


def _identity_names_and_positions(faces: SyntheticFaces, group: str):
  """RFW identity name and 1-based image number of each eval image of group."""
  if group not in faces.eval_identity:
    raise UserError(f"group: expected one of {sorted(faces.eval_identity)}, got {group!r}")
  identity = faces.eval_identity[group]
  names = [f"{group}_{int(i):04d}" for i in identity]
  positions = np.zeros(identity.shape[0], np.int64)
  counts: dict[int, int] = {}
  for k, i in enumerate(identity.tolist()):
    counts[i] = counts.get(i, 0) + 1
    positions[k] = counts[i]
  return names, positions


def verification_pairs_as_rfw(faces: SyntheticFaces, group: str) -> list[str]:
  """group's pairs as RFW pairs lines (tab-separated like RFW/LFW, no newline).

  Same: 'name i j'; different: 'name1 i name2 j'; i, j are 1-based image numbers of
  the file <name>_<i:04d>.jpg.
  """
  names, pos = _identity_names_and_positions(faces, group)
  lines = []
  for (a, b), same in zip(faces.eval_pairs[group].tolist(),
                          faces.eval_issame[group].tolist()):
    if same:
      lines.append(f"{names[a]}\t{pos[a]}\t{pos[b]}")
    else:
      lines.append(f"{names[a]}\t{pos[a]}\t{names[b]}\t{pos[b]}")
  return lines


def export_rfw(faces: SyntheticFaces, root: str | os.PathLike) -> None:
  """Writes the eval sets in RFW's test layout so RFW readers can read them.

  root/test/data/<group>/<identity>/<identity>_<4-digit>.jpg (JPEG, quality 95) and
  root/test/txts/<group>/<group>_pairs.txt.
  """
  from PIL import Image  # Optional dependency: only the export needs it.

  root = os.fspath(root)
  for group in faces.spec.group_names:
    names, pos = _identity_names_and_positions(faces, group)
    for k, (name, p) in enumerate(zip(names, pos.tolist())):
      folder = os.path.join(root, "test", "data", group, name)
      os.makedirs(folder, exist_ok=True)
      Image.fromarray(faces.eval_images[group][k]).save(
          os.path.join(folder, f"{name}_{p:04d}.jpg"), quality=95)
    txt_dir = os.path.join(root, "test", "txts", group)
    os.makedirs(txt_dir, exist_ok=True)
    with open(os.path.join(txt_dir, f"{group}_pairs.txt"), "w") as f:
      f.write("\n".join(verification_pairs_as_rfw(faces, group)) + "\n")
