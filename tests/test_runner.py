"""The sharded streaming runner: exact results whatever the batch size, device count or padding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import analysis_testing

from clmim.analysis import attention_distance, core, fourier, nmi, runner
from clmim.errors import ClmimError

G, PATCH, DIM, HEADS, DEPTH, NUM_IMAGES = 4, 2, 8, 2, 2, 70
ANALYSES = [attention_distance, nmi, fourier]


def _toy_params(seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]), jnp.float32)
  blocks = [{"qkv": normal(DIM, 3 * DIM), "out": normal(DIM, DIM), "mlp1": normal(DIM, 2 * DIM),
             "mlp2": normal(2 * DIM, DIM)} for _ in range(DEPTH)]
  return {"embed": normal(PATCH * PATCH * 3, DIM), "cls": normal(1, DIM),
          "pos": normal(G * G + 1, DIM), "blocks": blocks}


def _toy_forward(params, images):
  """A tiny ViT-shaped map, one image at a time (see `_toy_forward_one`)."""
  # NOTE: a batched float32 forward rounds differently for different batch shapes (matmul
  # blocking), ~1e-6 relative in zs, which log|fft| of small amplitudes amplifies to ~1e-4. Running
  # the model per image makes every image's zs/attns bitwise independent of batching, so these
  # tests measure the runner's own exactness, not the model's.
  zs, attns = jax.lax.map(lambda im: _toy_forward_one(params, im[None]), images)
  squeeze = lambda x: x[:, 0]
  return [squeeze(z) for z in zs], [squeeze(a) for a in attns]


def _toy_forward_one(params, images):
  """Fixed random linear layers, real softmax attention and residuals, on [b, H, W, 3]."""
  b = images.shape[0]
  patches = images.reshape(b, G, PATCH, G, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
  tokens = patches.reshape(b, G * G, -1) @ params["embed"]
  cls = jnp.broadcast_to(params["cls"], (b, 1, DIM))
  z = jnp.concatenate([cls, tokens], axis=1) + params["pos"]
  zs, attns = [z], []
  for blk in params["blocks"]:
    q, k, v = jnp.split((z @ blk["qkv"]).reshape(b, -1, HEADS, 3 * DIM // HEADS), 3, axis=-1)
    attn = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * 2.0, axis=-1)
    z = z + jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, -1, DIM) @ blk["out"]
    zs.append(z)
    z = z + jnp.tanh(z @ blk["mlp1"]) @ blk["mlp2"]
    zs.append(z)
    attns.append(attn)
  return zs, attns


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(42)
  return rng.normal(size=(NUM_IMAGES, G * PATCH, G * PATCH, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def params():
  return _toy_params()


@pytest.fixture(scope="module")
def analyzer8():
  assert jax.device_count() == 8
  return runner.Analyzer(_toy_forward, ANALYSES, PATCH)


@pytest.fixture(scope="module")
def reference(analyzer8, params, data):
  return analyzer8.run(params, _batched(data, 64), progress=False)


def _batched(images, size):
  return (images[i:i + size] for i in range(0, len(images), size))


def _assert_same(got, want):
  assert set(got) == set(want)
  assert got["num_images"] == want["num_images"]
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_matches_one_big_batch(reference, params, data):
  """The runner's means equal the metrics applied to all images at once, outside the runner."""
  zs, attns = jax.jit(_toy_forward)(params, data)
  weights = np.ones(NUM_IMAGES, np.float32)
  assert reference["num_images"] == NUM_IMAGES
  for module in ANALYSES:
    sums = jax.jit(lambda z, a, w, m=module: analysis_testing.partial_sums(m, z, a, w, PATCH))(
        zs, attns, weights)
    for key, value in analysis_testing.finalize(module, sums).items():
      np.testing.assert_allclose(reference[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
  assert np.shape(reference["attention_distance"]) == (DEPTH, HEADS)
  assert np.shape(reference["fourier"]) == (DEPTH + 1, G - G // 2)
  assert np.shape(reference["fourier_all_states"]) == (2 * DEPTH + 1, G - G // 2)


@pytest.mark.parametrize("batch_size", [1, 7])
def test_batch_size_invariance(analyzer8, reference, params, data, batch_size):
  _assert_same(analyzer8.run(params, _batched(data, batch_size), progress=False), reference)


def test_one_device_vs_eight(reference, params, data):
  mesh = runner.make_mesh(jax.devices()[:1])
  got = runner.Analyzer(_toy_forward, ANALYSES, PATCH, mesh=mesh).run(
      params, _batched(data, 7), progress=False)
  _assert_same(got, reference)


def test_garbage_padding_changes_nothing(analyzer8, reference, params, data):
  rng = np.random.default_rng(7)

  def padded():
    for images in _batched(data, 16):
      junk = rng.normal(size=(5,) + images.shape[1:]).astype(np.float32) * 1e3
      junk[0] = np.nan
      yield (np.concatenate([images, junk]),
             np.concatenate([np.ones(len(images)), np.zeros(len(junk))]).astype(np.float32))

  _assert_same(analyzer8.run(params, padded(), progress=False), reference)


def test_uneven_stream_and_num_images(analyzer8, reference, params, data):
  # First batch smaller than the device count; later batches larger than it (split, no recompile).
  sizes = [3, 20, 40, 7]
  bounds = np.cumsum([0] + sizes)
  stream = [data[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
  _assert_same(analyzer8.run(params, iter(stream), progress=False), reference)
  first50 = analyzer8.run(params, _batched(data[:50], 8), progress=False)
  _assert_same(analyzer8.run(params, _batched(data, 7), num_images=50, progress=False), first50)


def test_errors(analyzer8, params, data):
  with pytest.raises(ClmimError):
    analyzer8.run(params, iter([]), progress=False)
  with pytest.raises(ClmimError):
    analyzer8.run(params, iter([data[0]]), progress=False)  # not a batch
  with pytest.raises(ClmimError):
    runner.Analyzer(_toy_forward, [nmi, nmi], PATCH)


class _IndexProbe:
  """A minimal analysis module (the core protocol) that records which stream positions it saw
  and the first pixel of each: sums of one-hot rows, so each image must arrive exactly once."""
  NAME, OPTIONS, RESULTS = "index_probe", {"slots": NUM_IMAGES + 5}, ()

  @staticmethod
  def partial_sums(batch, options):
    onehot = (batch.index[:, None] == jnp.arange(options["slots"])[None]).astype(jnp.float32)
    pixel = batch.zs[0][:, 1, 0]  # any per-image value
    return {"seen": onehot.sum(0), "value": (onehot * pixel[:, None]).sum(0)}

  @staticmethod
  def finalize(sums, options):
    return {"seen": sums["seen"].tolist(), "value": sums["value"].tolist()}


@pytest.mark.parametrize("batch_size,devices", [(1, 8), (7, 8), (64, 1)])
def test_stream_index_reaches_every_image_exactly_once(params, data, batch_size, devices):
  mesh = runner.make_mesh(jax.devices()[:devices])
  analyzer = runner.Analyzer(_toy_forward, [_IndexProbe], PATCH, mesh=mesh, device_batch_size=3)
  batches = (data[i:i + batch_size] for i in range(0, NUM_IMAGES, batch_size))
  out = analyzer.run(params, batches, progress=False)
  assert out["seen"] == [1.0] * NUM_IMAGES + [0.0] * 5
  zs, _ = jax.jit(_toy_forward)(params, data)
  np.testing.assert_allclose(out["value"][:NUM_IMAGES], np.asarray(zs[0][:, 1, 0]), rtol=1e-6)
  # With a plan (the multi-process path), the positions are the plan's.
  plan = analyzer.plan(NUM_IMAGES)
  slots = [data[i] if i >= 0 else np.zeros_like(data[0]) for i in plan.local_indices]
  weights = (plan.local_indices >= 0).astype(np.float32)
  out = analyzer.run(params, [(np.stack(slots), weights)], progress=False, plan=plan)
  assert out["seen"] == [1.0] * NUM_IMAGES + [0.0] * 5
  assert analyzer.compilations == 1  # two runs, one compiled step


def test_options_are_checked(params):
  with pytest.raises(ClmimError, match=r"analysis_options.index_probe: unknown option 'slot'"):
    runner.Analyzer(_toy_forward, [_IndexProbe], PATCH, options={"index_probe": {"slot": 3}})


def test_text_options_are_read_as_literals():
  from clmim.analysis import core
  options = core.resolve_options(_IndexProbe, {"slots": "12"})
  assert options == {"slots": 12}
  assert core._literal("((1, 1), (2, 3))") == ((1, 1), (2, 3))
  assert core._literal("mean") == "mean" and core._literal("0,6") == (0, 6)


def test_compile_time_is_counted_once(params, data):
  analyzer = runner.Analyzer(_toy_forward, ANALYSES, PATCH, device_batch_size=2)
  analyzer.run(params, [data[:20]], progress=False)
  first = analyzer.compile_seconds
  analyzer.run(params, [data[20:40]], progress=False)
  assert analyzer.compilations == 1 and first > 0 and analyzer.compile_seconds == first


def test_running_sums_on_the_device_add_like_float64(monkeypatch):
  # 1 + 2000 x 1e-8: float32 alone stays at 1.0; the host's float64 is exact to round-off, the
  # devices' compensated pairs to ~1e-10 (their compensation term is itself float32).
  steps = [{"a": jnp.ones(3, jnp.float32), "b": jnp.float32(1.0)}] + \
      [{"a": jnp.full(3, 1e-8, jnp.float32), "b": jnp.float32(1e-8)}] * 2000
  for threshold, on_device, rtol in ((2, True, 1e-9), (10**9, False, 1e-14)):
    monkeypatch.setattr(runner, "DEVICE_SUM_MIN_SIZE", threshold)
    sums = runner.RunningSums()
    assert sums.result() is None
    for step in steps:
      sums.add(step)
    total = sums.result()
    assert sums._large == [on_device, False]  # the scalar is below both thresholds
    np.testing.assert_allclose(total["a"], 1 + 2000 * np.float64(np.float32(1e-8)), rtol=rtol)
    assert total["a"].dtype == np.float64


def test_sums_kept_on_the_device_change_nothing(monkeypatch, analyzer8, reference, params, data):
  monkeypatch.setattr(runner, "DEVICE_SUM_MIN_SIZE", 1)  # every sum on the device
  _assert_same(analyzer8.run(params, _batched(data, 16), progress=False), reference)


def test_a_model_given_to_the_analyzer_is_checked_before_anything_compiles():
  from clmim.analysis import decoder, svd
  from clmim.models.vit import build_vit
  vit = build_vit("mu/4", image_size=16, depth=2)  # a bare ViT: no decoder
  with pytest.raises(ClmimError, match=r"Analyzer: analysis 'decoder': .*has no decoder"):
    runner.Analyzer(_toy_forward, [nmi, decoder], PATCH, model=vit)
  # The options are checked against the model too: block 5 of a 2-block ViT does not exist.
  with pytest.raises(ClmimError, match=r"Analyzer: analysis 'svd'"):
    runner.Analyzer(_toy_forward, [svd], PATCH, model=vit, options={"svd": {"block": 5}})
  # Accepted: nothing refused, and nothing compiled yet.
  analyzer = runner.Analyzer(_toy_forward, [nmi, svd], PATCH, model=vit,
                             options={"svd": {"block": 1}})
  assert analyzer.compilations == 0
  # Without a model the checks are the caller's, as before.
  runner.Analyzer(_toy_forward, [decoder], PATCH)


def test_analyses_are_the_modules_that_declare_themselves():
  """No list of helpers: a module of clmim/analysis/ is an analysis when its NAME is its file
  name and it declares RESULTS."""
  names = core.available()
  assert {"nmi", "fourier", "token_norms", "probing"} <= set(names)
  assert not {"core", "runner", "plots", "noise", "linear_probe", "bootstrap"} & set(names)
  assert all(core.load(name).NAME == name for name in names)


def test_the_runner_counts_the_images_an_analysis_never_does():
  # The image count every finalize divides by is added by the runner (core.sums_of); an
  # analysis that returns the key itself is refused, naming it.
  import types
  batch = core.Batch([], [], jnp.asarray([1.0, 0.0, 2.0]), jnp.asarray([0, -1, 1]), 4)
  own = types.SimpleNamespace(NAME="own", partial_sums=lambda b, o: {"x": b.weights.sum()})
  assert float(core.sums_of(own, batch, {})["count"]) == 3.0  # weights of the real images
  counting = types.SimpleNamespace(NAME="counting",
                                   partial_sums=lambda b, o: {"count": b.weights.sum()})
  with pytest.raises(ClmimError, match="'counting': partial_sums returns 'count'"):
    core.sums_of(counting, batch, {})
