"""WCT numerics: golden features of the official code, rank deficiency, invariants."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdft.stylize import wct


def _np_wct(c, s, alpha=1.0, rtol=1e-12):
  """Float64 numpy reference: WCT on live channels with a relative eigen cut-off."""
  c = c.reshape(-1, c.shape[-1]).astype(np.float64)
  s = s.reshape(-1, s.shape[-1]).astype(np.float64)

  def power(x, p):
    mu = x.mean(0)
    cov = (x - mu).T @ (x - mu) / (len(x) - 1)
    live = np.diag(cov) > 0
    sub = cov[np.ix_(live, live)]
    e, v = np.linalg.eigh(sub)
    keep = e > rtol * e.max()
    out = np.zeros_like(cov)
    out[np.ix_(live, live)] = (v[:, keep] * e[keep] ** p) @ v[:, keep].T
    return mu, out

  mc, wc = power(c, -0.5)
  ms, cs = power(s, 0.5)
  t = (c - mc) @ wc.T @ cs.T + ms
  return alpha * t + (1 - alpha) * c


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_matches_official_wct_on_golden_features(golden_dir, level):
  c = np.load(golden_dir / f"se{level}_relu{level}_1.npy")
  s = np.load(golden_dir / f"se{level}_relu{level}_1_style.npy")
  ref = np.load(golden_dir / f"wct16x_level{level}_csF.npy")
  with wct.x64_scope(jnp.float64):
    got = np.asarray(wct.wct(c, s, 1.0))
  err = np.abs(got - ref).max()
  assert err <= 1e-5 * np.abs(ref).max() + 1e-5, err


def test_statistics_are_float64_accurate():
  rng = np.random.default_rng(0)
  # Large mean, small spread: the case where one-pass float32 statistics cancel.
  f = (1000.0 + rng.standard_normal((50_001, 8)) * rng.uniform(0.01, 2, 8)).astype(np.float32)
  ref_mean = f.astype(np.float64).mean(0)
  g = f.astype(np.float64) - ref_mean
  ref_cov = g.T @ g / (len(f) - 1)
  with wct.x64_scope(jnp.float64):
    st = jax.jit(lambda x: wct.feature_stats(x, block_rows=4096))(f)
  np.testing.assert_allclose(np.asarray(st.mean), ref_mean, rtol=1e-13)
  np.testing.assert_allclose(np.asarray(st.cov), ref_cov, rtol=1e-10, atol=1e-12)
  assert int(st.count) == len(f)


def test_fewer_positions_than_channels_is_stable():
  """A 3x3 style map with 32 channels: rank 8; no blow-up from null eigenvalues."""
  rng = np.random.default_rng(1)
  c = np.maximum(rng.standard_normal((1, 16, 16, 32)), 0).astype(np.float32)
  s = np.maximum(rng.standard_normal((1, 3, 3, 32)) * 3 + 1, 0).astype(np.float32)
  with wct.x64_scope(jnp.float64):
    got = np.asarray(wct.wct(c, s, 1.0))
  assert np.isfinite(got).all()
  ref = _np_wct(c, s)
  np.testing.assert_allclose(got.reshape(ref.shape), ref, atol=1e-4 * np.abs(ref).max())
  # The output covariance equals the style's on the style's (rank-8) subspace.
  out = got.reshape(-1, 32).astype(np.float64)
  s2 = s.reshape(-1, 32).astype(np.float64)
  np.testing.assert_allclose(np.cov(out.T), np.cov(s2.T), atol=1e-3 * np.cov(s2.T).max())


def test_dead_channels_stay_zero_and_live_ones_get_style_statistics():
  rng = np.random.default_rng(2)
  c = rng.gamma(2.0, 1.0, (1, 20, 20, 12)).astype(np.float32)
  s = rng.gamma(3.0, 2.0, (1, 30, 30, 12)).astype(np.float32)
  c[..., 5] = 0  # dead in both (as the SE's dead ReLUs)
  s[..., 5] = 0
  with wct.x64_scope(jnp.float64):
    got = np.asarray(wct.wct(c, s, 1.0)).reshape(-1, 12).astype(np.float64)
  assert np.isfinite(got).all()
  np.testing.assert_array_equal(got[:, 5], 0)
  live = [i for i in range(12) if i != 5]
  s2 = s.reshape(-1, 12).astype(np.float64)
  np.testing.assert_allclose(got[:, live].mean(0), s2[:, live].mean(0), rtol=1e-4)
  np.testing.assert_allclose(np.cov(got[:, live].T), np.cov(s2[:, live].T), rtol=1e-3, atol=1e-3)


def test_channels_dead_in_only_one_input_follow_the_reference():
  rng = np.random.default_rng(5)
  c = rng.gamma(2.0, 1.0, (1, 20, 20, 12)).astype(np.float32)
  s = rng.gamma(3.0, 2.0, (1, 30, 30, 12)).astype(np.float32)
  c[..., [1, 5]] = 0
  s[..., [5, 9]] = 0
  with wct.x64_scope(jnp.float64):
    got = np.asarray(wct.wct(c, s, 1.0)).reshape(-1, 12)
  np.testing.assert_array_equal(got[:, [5, 9]], 0)  # no style energy there
  np.testing.assert_allclose(got, _np_wct(c, s), atol=1e-4)


def test_alpha_blend_and_identity():
  rng = np.random.default_rng(3)
  c = rng.gamma(2.0, 1.0, (1, 10, 10, 6)).astype(np.float32)
  s = rng.gamma(2.0, 3.0, (1, 12, 8, 6)).astype(np.float32)
  with wct.x64_scope(jnp.float64):
    full = np.asarray(wct.wct(c, s, 1.0))
    none = np.asarray(wct.wct(c, s, 0.0))
    half = np.asarray(wct.wct(c, s, 0.6))
    self_ = np.asarray(wct.wct(c, c, 1.0))
  np.testing.assert_allclose(none, c, atol=1e-5)
  np.testing.assert_allclose(half, 0.6 * full + 0.4 * c, atol=1e-4)
  np.testing.assert_allclose(self_, c, atol=1e-4)  # WCT of a map onto itself is the identity


def test_style_blend_is_the_weighted_mix_of_targets():
  rng = np.random.default_rng(4)
  c = rng.gamma(2.0, 1.0, (200, 5))
  s1 = rng.gamma(2.0, 3.0, (300, 5))
  s2 = rng.gamma(5.0, 0.5, (250, 5))
  with wct.x64_scope(jnp.float64):
    cs, a, b = (wct.feature_stats(jnp.asarray(x)) for x in (c, s1, s2))
    m, off = wct.wct_matrix(cs, [(0.7, a), (0.3, b)])
    m1, o1 = wct.wct_matrix(cs, a)
    m2, o2 = wct.wct_matrix(cs, b)
  np.testing.assert_allclose(m, 0.7 * np.asarray(m1) + 0.3 * np.asarray(m2), rtol=1e-12)
  np.testing.assert_allclose(off, 0.7 * np.asarray(o1) + 0.3 * np.asarray(o2), rtol=1e-10)


def test_merged_statistics_of_parts_equal_those_of_the_union():
  rng = np.random.default_rng(3)
  f = rng.normal(2.0, 3.0, size=(500, 6)) @ rng.normal(size=(6, 6))
  cuts = [0, 7, 130, 131 + 1, 400, 500]  # parts of 7, 123, 2, 268 and 100 rows
  with jax.enable_x64(True):
    parts = [wct.feature_stats(jnp.asarray(f[a:b])) for a, b in zip(cuts, cuts[1:])]
    stacked = jax.jit(wct.merge_stacked_stats)(jax.tree.map(lambda *x: jnp.stack(x), *parts))
  looped = wct.merge_stats(parts)
  np.testing.assert_allclose(stacked.mean, f.mean(0), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(stacked.cov, np.cov(f, rowvar=False), rtol=1e-11, atol=1e-11)
  assert float(stacked.count) == 500
  np.testing.assert_allclose(stacked.cov, looped.cov, rtol=1e-12, atol=1e-12)
