"""Margin logits, elastic margins, the ElasticFace+ rule and KD loss against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mstkd_jax import losses
from mstkd_jax.models import heads


def numpy_margin_logits(cos, labels, margins, name, s):
  """Written from the formulas: s*cos(theta+m) (ArcFace-like) or s*(cos-m), target only."""
  cos = np.clip(np.asarray(cos, np.float64), -1, 1)
  out = s * cos.copy()
  for i, (label, m) in enumerate(zip(labels, margins)):
    if "arcface" in name:
      out[i, label] = s * np.cos(np.arccos(cos[i, label]) + m)
    else:
      out[i, label] = s * (cos[i, label] - m)
  return out


@pytest.mark.parametrize("name", losses.HEADS)
def test_margin_logits_match_numpy(name):
  rng = np.random.default_rng(0)
  cos = rng.uniform(-0.9, 0.9, (6, 5)).astype(np.float32)
  labels = np.array([0, 1, 2, 3, 4, 0])
  margins = rng.normal(0.4, 0.05, 6).astype(np.float32)
  spec = losses.MarginSpec(name, s=64.0, m=0.5, std=0.05)
  got = losses.margin_logits(jnp.asarray(cos), jnp.asarray(labels), jnp.asarray(margins), spec)
  np.testing.assert_allclose(got, numpy_margin_logits(cos, labels, margins, name, 64.0),
                             rtol=1e-5, atol=1e-4)


def test_cross_entropy_matches_numpy():
  logits = np.random.default_rng(1).normal(0, 5, (4, 7)).astype(np.float32)
  labels = np.array([1, 0, 6, 3])
  z = logits - logits.max(1, keepdims=True)
  expected = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(4), labels])
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), expected, rtol=1e-6)


@pytest.mark.parametrize("name", ["arcface", "elastic_arcface", "cosface"])
def test_no_nan_or_inf_at_cos_plus_minus_one(name):
  spec = losses.MarginSpec(name)
  cos = jnp.asarray([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.5]])
  labels = jnp.asarray([0, 0])

  def loss(c):
    return losses.cross_entropy(losses.margin_logits(c, labels, jnp.full(2, 0.5), spec), labels)
  value, grad = jax.value_and_grad(loss)(cos)
  assert np.isfinite(value) and np.isfinite(np.asarray(grad)).all()


def test_bfloat16_cosines_give_float32_logits():
  cos = jnp.asarray([[0.3, -0.2]], jnp.bfloat16)
  out = losses.margin_logits(cos, jnp.asarray([0]), jnp.asarray([0.5]), losses.MarginSpec())
  assert out.dtype == jnp.float32


def test_plus_rule_on_a_hand_made_batch():
  # margins drawn [0.50, 0.40, 0.60, 0.45] -> sorted ascending [0.40, 0.45, 0.50, 0.60];
  # target cosines [0.1, 0.9, 0.5, 0.3] -> indices by descending cosine: [1, 2, 3, 0];
  # sample i receives sorted[order[i]]: [0.45, 0.50, 0.60, 0.40].
  margins = jnp.asarray([0.50, 0.40, 0.60, 0.45])
  target_cos = jnp.asarray([0.1, 0.9, 0.5, 0.3])
  np.testing.assert_allclose(losses.plus_assignment(margins, target_cos),
                             [0.45, 0.50, 0.60, 0.40])


def test_elastic_margins_are_drawn_per_sample_and_step():
  spec = losses.MarginSpec("elastic_arcface", m=0.5, std=0.05)
  target = jnp.zeros(4096)
  a = losses.draw_margins(jax.random.PRNGKey(0), target, spec)
  b = losses.draw_margins(jax.random.PRNGKey(1), target, spec)
  assert abs(float(a.mean()) - 0.5) < 0.005 and abs(float(a.std()) - 0.05) < 0.005
  assert not np.allclose(a, b)
  fixed = losses.draw_margins(jax.random.PRNGKey(0), target, losses.MarginSpec("arcface"))
  np.testing.assert_array_equal(fixed, np.full(4096, 0.5, np.float32))


def test_margins_under_a_mapped_axis_equal_the_global_draw():
  spec = losses.MarginSpec("elastic_cosface_plus", m=0.35, std=0.02)
  target = jnp.linspace(-1, 1, 16)[::-1] * jnp.asarray([1, -1] * 8)
  key = jax.random.PRNGKey(3)
  whole = losses.draw_margins(key, target, spec)
  per_device = jax.vmap(lambda t: losses.draw_margins(key, t, spec, axis_name="d"),
                        axis_name="d")(target.reshape(4, 4))
  np.testing.assert_allclose(per_device.reshape(-1), whole, rtol=1e-6)


def test_kd_loss_matches_numpy():
  rng = np.random.default_rng(2)
  target = rng.normal(size=(3, 8)).astype(np.float32)
  target /= np.linalg.norm(target, axis=1, keepdims=True)
  student = rng.normal(size=(3, 8)).astype(np.float32) * 4
  normed = student / np.linalg.norm(student, axis=1, keepdims=True)
  np.testing.assert_allclose(losses.kd_loss(target, student, 10000.0),
                             10000.0 * np.mean((target - normed) ** 2), rtol=1e-5)


def test_margin_head_returns_cosines():
  head = heads.MarginHead(num_classes=3)
  emb = np.random.default_rng(3).normal(size=(2, 5)).astype(np.float32)
  variables = head.init(jax.random.PRNGKey(0), emb)
  kernel = np.asarray(variables["params"]["kernel"])
  assert kernel.shape == (5, 3) and abs(kernel.std() - 0.01) < 0.005
  expected = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (
      kernel / np.linalg.norm(kernel, axis=0, keepdims=True))
  np.testing.assert_allclose(head.apply(variables, emb), expected, rtol=1e-5, atol=1e-6)


def test_unknown_head_is_refused():
  with pytest.raises(ValueError, match="margin head must be one of"):
    losses.MarginSpec("sphereface")


# --- l2_normalize ----------------------------------------------------------------------


def _l2_normalize_before_the_zero_guard(x, axis=-1, eps=1e-12):
  """The formula l2_normalize had before its gradient at 0 was made finite."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True)), eps)


def _normalize_inputs():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(16, 64)).astype(np.float32)
  x *= np.asarray([1e-30, 1e-20, 1e-6, 1.0, 1e3, 1e15] * 2 + [1.0] * 4, np.float32)[:, None]
  x[3] = 0.0
  x[7, :] = 0.0
  return x


def test_l2_normalize_matches_numpy_and_torch_normalize_values():
  x = _normalize_inputs()
  norm = np.sqrt((x.astype(np.float64) ** 2).sum(axis=1, keepdims=True))
  expected = x / np.maximum(norm, 1e-12)
  got = np.asarray(losses.l2_normalize(jnp.asarray(x)))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-30)
  np.testing.assert_array_equal(got[3], np.zeros(64, np.float32))
  kernel = np.random.default_rng(5).normal(size=(64, 10)).astype(np.float32)
  kernel[:, 2] = 0.0
  np.testing.assert_allclose(
      losses.l2_normalize(jnp.asarray(kernel), axis=0),
      kernel / np.maximum(np.linalg.norm(kernel.astype(np.float64), axis=0), 1e-12),
      rtol=2e-6)


def test_l2_normalize_values_and_gradients_are_unchanged_where_nonzero():
  # Bit for bit, alone and inside a jitted head + loss, so recipes give the same numbers.
  x = _normalize_inputs()
  x = x[np.abs(x).sum(axis=1) > 0]
  for dtype in (jnp.float32, jnp.bfloat16):
    for wrap in (lambda f: f, jax.jit):
      np.testing.assert_array_equal(
          np.asarray(wrap(losses.l2_normalize)(jnp.asarray(x, dtype))),
          np.asarray(wrap(_l2_normalize_before_the_zero_guard)(jnp.asarray(x, dtype))))
  rng = np.random.default_rng(6)
  emb = jnp.asarray(rng.normal(size=(8, 32)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(32, 5)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 5, 8))

  def head_loss(normalize):
    def loss(e, k):
      cos = normalize(e) @ normalize(k, axis=0)
      spec = losses.MarginSpec("arcface")
      return losses.cross_entropy(losses.margin_logits(cos, labels, jnp.full(8, 0.5), spec),
                                  labels)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

  new = head_loss(losses.l2_normalize)(emb, kernel)
  old = head_loss(_l2_normalize_before_the_zero_guard)(emb, kernel)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               new, old)


def test_l2_normalize_gradient_at_zero_is_finite_as_in_torch():
  x = _normalize_inputs()
  weights = np.random.default_rng(7).normal(size=x.shape).astype(np.float32)

  def objective(v):
    return jnp.sum(losses.l2_normalize(v) * weights)
  grad = np.asarray(jax.grad(objective)(jnp.asarray(x)))
  assert np.isfinite(grad).all()
  old = np.asarray(jax.grad(lambda v: jnp.sum(_l2_normalize_before_the_zero_guard(v) * weights))(
      jnp.asarray(x)))
  assert np.isnan(old[3]).all()  # What the guard fixes.
  # At 0 the value is x / eps, so the gradient is weights / eps (PyTorch's too).
  np.testing.assert_allclose(grad[3], weights[3] / 1e-12, rtol=1e-6)
  # Elsewhere: d(x/|x|) w = (w - (w.u) u) / |x| with u = x/|x|, written out in float64.
  for row in (8, 9, 10, 12, 15):
    v, w = x[row].astype(np.float64), weights[row].astype(np.float64)
    n = np.linalg.norm(v)
    u = v / n
    np.testing.assert_allclose(grad[row], (w - (w @ u) * u) / n, rtol=1e-4,
                               atol=1e-6 * np.abs(grad[row]).max())
  torch = pytest.importorskip("torch")
  tx = torch.tensor(x, requires_grad=True)
  (torch.nn.functional.normalize(tx, dim=-1, eps=1e-12) * torch.tensor(weights)).sum().backward()
  reference = tx.grad.numpy()
  assert np.isfinite(reference).all()
  for row in range(len(x)):
    np.testing.assert_allclose(grad[row], reference[row], rtol=1e-4,
                               atol=1e-6 * np.abs(reference[row]).max(), err_msg=str(row))
