"""Exact tiled WCT: equality with the whole-image cascade, no seams, bounded windows."""
import numpy as np
import pytest

from cdft.io import images
from cdft.evaluation import metrics as eval_metrics
from cdft.stylize import cascade, tile_plan, tiled
from cdft.weights import pretrained


def test_windows_cover_the_axis_once_and_stay_inside():
  for n, core, halo, f in [(1000, 176, 160, 16), (1013, 176, 160, 16), (512, 240, 72, 8),
                           (300, 64, 10, 2), (100, 64, 80, 1)]:
    wins = tile_plan.windows_1d(n, core, halo, f)
    n_out = n // f * f
    covered = np.zeros(n_out, int)
    for w in wins:
      covered[w.c0:w.c1] += 1
      assert 0 <= w.w0 and w.w1 <= n and w.w0 % f == 0
      # The core has the full halo on each side unless it touches the image edge,
      # and a window reaching the output's end takes the trailing remainder too.
      assert w.c0 - w.w0 >= min(halo, w.c0)
      assert w.w1 - w.c1 >= min(halo, n_out - w.c1)
      assert w.w1 == n or w.c1 < n_out
    assert len({w.w1 - w.w0 for w in wins}) <= 2
    np.testing.assert_array_equal(covered, 1)


def test_fixed_shape_plan_writes_every_output_pixel_once_from_exact_windows():
  for n, tile, halo, f, num, den in [(1000, 176, 160, 16, 1, 1), (1013, 176, 96, 16, 1, 16),
                                     (130, 11, 6, 1, 16, 1), (520, 112, 40, 8, 1, 8),
                                     (300, 512, 10, 2, 1, 1)]:
    size, length, steps = tile_plan.axis_plan(n, tile, halo, f, num, den)
    n_out = (n // f) * f * num // den
    written, counted = np.zeros(n_out, bool), np.zeros(n_out, int)
    for (start, lo, hi, src, dst), win in zip(steps, tile_plan.windows_1d(n, tile, halo, f)):
      assert start == win.w0 and start + size <= n
      out_size = (size // f) * f * num // den
      # The core is counted once (statistics) and the written span lies in the
      # part of the window's output that is exact: a halo from each window edge
      # that is not the image's edge.
      assert (lo, hi) == ((win.c0 - start) * num // den, (win.c1 - start) * num // den)
      exact_lo = 0 if start == 0 else halo * num // den
      exact_hi = out_size if start + size >= (n // f) * f else out_size - halo * num // den
      assert exact_lo <= src and src + length <= exact_hi
      assert src <= lo and hi <= src + length and dst - src == start * num // den
      written[dst:dst + length] = True  # (the last span may rewrite exact pixels)
      counted[lo + dst - src:hi + dst - src] += 1
    assert written.all()
    np.testing.assert_array_equal(counted, 1)


def test_halos_cover_the_receptive_fields():
  # One side of a stage-k encoder reaches sum(convs of block b * 2^(b-1)) px:
  # 1, 4, 10, 30, 70; the decoder mirrors it. Plus one pooling cell, aligned.
  assert [tile_plan.encoder_halo(k) for k in range(1, 6)] == [2, 6, 16, 40, 96]
  assert [tile_plan.level_halo(k) for k in range(1, 6)] == [3, 10, 24, 72, 160]


def _balanced_core(n, count, f):
  """The core of ``count`` equal tiles of an axis's output, rounded up to ``f``."""
  per_tile = -(-(n // f * f) // count)
  return -(-per_tile // f) * f


def _longest(n, core, halo, f):
  return max(w.w1 - w.w0 for w in tile_plan.windows_1d(n, core, halo, f))


def test_budget_to_tiles():
  assert tile_plan.parse_bytes("4G") == 4 << 30 and tile_plan.parse_bytes("512M") == 512 << 20
  with pytest.raises(ValueError, match="memory size"):
    tile_plan.parse_bytes("lots")
  assert tile_plan.window_area_for_budget(8 << 30) > 2 * tile_plan.window_area_for_budget(4 << 30)
  with pytest.raises(ValueError, match="too small"):
    tile_plan.cores_for_budget(720 << 20, 1000, 1000, 5)
  # The windows (with the level's widest halo) fit the budget's area, and no
  # grid of fewer tiles would: brute force over the windows windows_1d makes.
  for budget, h, w, k in [(2 << 30, 2160, 3840, 2), (3 << 30, 2160, 3840, 5),
                          (4 << 30, 4096, 10240, 2), (1 << 30, 1013, 2000, 3),
                          (4 << 30, 10000, 10000, 5), (3 << 30, 520, 650, 1)]:
    area, halo, f = tile_plan.window_area_for_budget(budget), tile_plan.level_halo(k), 2 ** (k - 1)
    core_r, core_c = tile_plan.cores_for_budget(budget, h, w, k)
    assert core_r % f == 0 and core_c % f == 0
    assert _longest(h, core_r, halo, f) * _longest(w, core_c, halo, f) <= area
    count = len(tile_plan.windows_1d(h, core_r, halo, f)) * len(tile_plan.windows_1d(w, core_c, halo, f))
    for rows in range(1, count):
      for cols in range(1, count // rows + (count % rows > 0)):
        if rows * cols >= count:
          continue
        cr, cc = _balanced_core(h, rows, f), _balanced_core(w, cols, f)
        assert _longest(h, cr, halo, f) * _longest(w, cc, halo, f) > area, (budget, h, w, rows, cols)
  # A UHD frame is one window at 4G; at 3G it is two full-height strips.
  assert tile_plan.cores_for_budget(4 << 30, 2160, 3840, 2) == (2160, 3840)
  assert tile_plan.cores_for_budget(3 << 30, 2160, 3840, 2) == (2160, 1920)


@pytest.fixture(scope="module")
def setup(weights_dir, images_dir, tmp_path_factory):
  stylizer = cascade.Stylizer(pretrained.load_levels(
      "cd16x", weights_dir=weights_dir, cache_dir=tmp_path_factory.mktemp("cache")))
  content = images.load_image(images_dir / "content/adain_newyork.jpg", 520)[:520, :650]
  style = images.load_image(images_dir / "style/adain_la_muse.jpg", 200)
  whole = stylizer.stylize(content, style)
  return stylizer, content, style, whole


def _check_equal_without_seams(got, whole, tile, levels):
  assert got.shape == whole.shape
  assert eval_metrics.psnr(got, whole) >= 50.0
  assert np.abs(got - whole).max() < 1e-2
  # No seam: the gradient across the tile boundaries of every level is the
  # whole-image gradient there (within 1%).
  rows = sorted({b for k in levels
                 for b in tile_plan.tile_boundaries(520, tile, tile_plan.level_halo(k), 2 ** (k - 1))})
  cols = sorted({b for k in levels
                 for b in tile_plan.tile_boundaries(650, tile, tile_plan.level_halo(k), 2 ** (k - 1))})
  assert rows and cols
  r_tiled = eval_metrics.seam_ratio(got, rows, cols)
  r_whole = eval_metrics.seam_ratio(whole, rows, cols)
  assert abs(r_tiled / r_whole - 1) < 0.01


def test_tiled_cascade_equals_whole_image(setup):
  stylizer, content, style, whole = setup
  tile = 176  # divides neither 520 x 650 nor the 512 x 640 output
  got = tiled.TiledStylizer(stylizer, tile=tile).stylize(content, style).to_array()
  assert whole.shape == (512, 640, 3)
  _check_equal_without_seams(got, whole, tile, (5, 4, 3, 2, 1))


def test_in_memory_and_streamed_levels_agree(setup, tmp_path):
  # An image held in memory runs each level as one program over its tiles; an
  # image in a file runs tile by tile. The windows and arithmetic are the same.
  # So does an image in memory whose copies would not fit a quarter of the budget.
  # (The in-memory runs equal the whole image: test_tiled_cascade_equals_whole_image.)
  stylizer, content, style, _ = setup
  small = 4 << 20
  need = tiled.TiledStylizer(stylizer, tile=96).resident_bytes(2, 520, 650)
  assert small // 4 < need <= (4 << 30) // 4
  for mode, levels in (("exact", (4, 2, 1)), ("thumbnail", (3,))):
    runs = [tiled.TiledStylizer(stylizer, tile=96, stats_mode=mode, thumbnail_size=256,
                                on_disk=on_disk, temp_dir=tmp_path, max_memory=budget).stylize(
                                    content, style, alpha=0.8, levels=levels).to_array()
            for on_disk, budget in ((False, 4 << 30), (True, 4 << 30), (False, small))]
    np.testing.assert_allclose(runs[0], runs[1], atol=2e-5)
    np.testing.assert_allclose(runs[0], runs[2], atol=2e-5)
    assert not list(tmp_path.iterdir())  # the on-disk level files are already unlinked


def test_budget_tiles_in_memory_and_on_disk(setup, tmp_path):
  # Without --tile, the budget gives each level the fewest tiles whose windows
  # fit its area: at 820M the 650 x 520 image is two full-height strips (cores
  # of unequal sides), in memory and in files alike.
  stylizer, content, style, _ = setup
  levels, budget = (4, 2), 820 << 20
  whole = stylizer.stylize(content, style, levels=levels)
  plan = tiled.TiledStylizer(stylizer, max_memory=budget).plan(520, 650, levels)
  assert [p[3:] for p in plan] == [(520, 328, 1, 2), (520, 324, 1, 2)]
  runs = [tiled.TiledStylizer(stylizer, max_memory=budget, on_disk=on_disk,
                              temp_dir=tmp_path).stylize(content, style, levels=levels).to_array()
          for on_disk in (False, True)]
  np.testing.assert_allclose(runs[0], runs[1], atol=2e-5)
  assert eval_metrics.psnr(runs[0], whole) >= 50.0


def test_thumbnail_statistics_approximate_the_exact_result(setup):
  stylizer, content, style, _ = setup
  levels = (5, 4)
  exact = stylizer.stylize(content, style, levels=levels)

  def thumbnail_run(size):
    return tiled.TiledStylizer(stylizer, tile=240, stats_mode="thumbnail",
                               thumbnail_size=size).stylize(content, style, levels=levels)

  # A thumbnail as large as the image is the image: the exact result.
  assert eval_metrics.psnr(thumbnail_run(1024).to_array(), exact) >= 50.0
  # A half-size thumbnail approximates it (URST's trade-off), measurably worse.
  value = eval_metrics.psnr(thumbnail_run(320).to_array(), exact)
  assert 8.0 < value < 40.0
