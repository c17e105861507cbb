"""Register tokens and models without a cls token in the analyses that read the cls token or
average the patch tokens (tsne, rollout, cka, object_attention, probing with its k-NN probe,
robustness), in the between-models pairing and in fine-tuning's pooling.

Each analysis sees paper-layout states ([cls][patches]) and the same cls and patch tokens laid
out with two register tokens after cls, without cls, or both. Registers hold values unlike any
patch token, and the attention that moves to them is taken from the patch keys in proportion, so
every patch-renormalised quantity is unchanged: patch-based results must equal the paper
layout's, cls-based ones too while there is a cls token, and without one the cls-based results
are left out (None / missing key) or refused where only they were asked for.
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import analysis_testing

from test_probing import _Data  # the same fake labelled data as the probing tests
from clmim.analysis import cka, core, object_attention, probing, robustness, rollout, runner, tsne
from clmim.data.eval_data import Labels
from clmim.errors import ClmimError

PAPER = core.TokenLayout()
REGISTERS = core.TokenLayout(3, True)  # cls, then 2 registers
NO_CLS = core.TokenLayout(0, False)
NO_CLS_REGISTERS = core.TokenLayout(2, False)
OTHER_LAYOUTS = (REGISTERS, NO_CLS, NO_CLS_REGISTERS)


def _model(layout, **vit_fields):
  """A stand-in registry Model whose ViT has `layout`'s tokens (and `vit_fields`)."""
  vit = types.SimpleNamespace(num_prefix_tokens=layout.prefix, class_token=layout.has_cls,
                              **vit_fields)
  return types.SimpleNamespace(vit=vit, name="stand-in")


def _relayout_states(z, layout, rng):
  """Paper-layout states [b, 1 + N, D] -> the same cls (if kept) and patch tokens in `layout`,
  the registers image-dependent and far from every other token."""
  z = np.asarray(z)
  b, _, d = z.shape
  parts = [z[:, :1]] if layout.has_cls else []
  if layout.num_registers:
    parts.append((40 + 10 * rng.normal(size=(b, layout.num_registers, d))).astype(z.dtype))
  return np.concatenate(parts + [z[:, 1:]], axis=1)


def _relayout_attention(a, layout, rng, keep=0.6):
  """Paper maps [b, H, 1 + N, 1 + N] -> maps in `layout`. Rows of the cls query (if kept) and of
  the patch queries keep their cls entry (if kept) and `keep` x their patch entries; the rest of
  the row goes to the registers evenly (without registers the row is renormalised). So each
  row's patch entries, renormalised over the patches, are the paper's. Register queries attend
  at random."""
  a = np.asarray(a, np.float64)
  b, h, t, _ = a.shape
  c, r, n = int(layout.has_cls), layout.num_registers, t - 1
  queries = a if c else a[:, :, 1:]  # [b, h, c + n, 1 + N]
  cls_part = queries[..., :1] if c else queries[..., :0]
  patch = queries[..., 1:] * (keep if r else 1.0)
  rest = np.maximum(1.0 - cls_part.sum(-1, keepdims=True) - patch.sum(-1, keepdims=True), 0.0)
  rows = np.concatenate([cls_part, np.repeat(rest / max(r, 1), r, axis=-1), patch], axis=-1)
  rows = rows / rows.sum(-1, keepdims=True)
  out = np.zeros((b, h, c + r + n, c + r + n))
  out[:, :, :c] = rows[:, :, :c]
  out[:, :, c + r:] = rows[:, :, c:]
  if r:
    random = rng.random(size=(b, h, r, c + r + n))
    out[:, :, c:c + r] = random / random.sum(-1, keepdims=True)
  return out.astype(np.float32)


def _random_softmax(rng, b, h, t, scale=2.0):
  logits = rng.normal(size=(b, h, t, t)) * scale
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def _sums(module, zs, attns, layout, options=None, weights=None):
  """`module.partial_sums` of one jitted batch in `layout`, as float64 numpy."""
  b = (zs or attns)[0].shape[0]
  weights = np.ones(b, np.float32) if weights is None else weights
  step = jax.jit(lambda z, a, w: analysis_testing.partial_sums(module, z, a, w, options=options,
                                                               layout=layout))
  out = step([jnp.asarray(z) for z in zs or []], [jnp.asarray(a) for a in attns or []],
             jnp.asarray(weights))
  return jax.tree.map(lambda x: np.asarray(x, np.float64), out)


# ---------------------------------------------------------------------------------- tsne

def test_tsne_gathers_the_same_patch_tokens_on_every_layout():
  rng = np.random.default_rng(0)
  zs = [rng.normal(size=(6, 10, 4)).astype(np.float32) for _ in range(5)]
  options = {"images": (0, 2, 5), "max_tokens_per_image": 4}
  paper = _sums(tsne, zs, None, PAPER, options)
  for layout in OTHER_LAYOUTS:
    got = _sums(tsne, [_relayout_states(z, layout, rng) for z in zs], None, layout, options)
    for key in ("found", "state_tokens", "stage_tokens"):
      np.testing.assert_array_equal(got[key], paper[key], err_msg=f"{layout} {key}")


# ------------------------------------------------------------------------------- rollout

def test_rollout_with_unattended_registers_is_the_papers_and_without_cls_is_omitted():
  """Registers take part in the rolled-out products; registers no cls or patch query attends to
  pass nothing on, so the cls rollout over the patches is the paper layout's."""
  rng = np.random.default_rng(1)
  attns = [_random_softmax(rng, 4, 2, 17) for _ in range(3)]  # 4 x 4 patches
  options = {"images": (3, 0)}
  paper = analysis_testing.finalize(rollout, _sums(rollout, None, attns, PAPER, options),
                                    options)
  moved = [_relayout_attention(a, REGISTERS, rng, keep=1.0) for a in attns]
  got = analysis_testing.finalize(rollout, _sums(rollout, None, moved, REGISTERS, options),
                                  options)
  for key in ("rollout_spread", "rollout_entropy", "rollout_map"):
    np.testing.assert_allclose(got[key], paper[key], rtol=1e-5, atol=1e-7, err_msg=key)
  assert got["rollout_map_images"] == paper["rollout_map_images"] == [3, 0]
  # Attention on the registers changes what reaches cls: they are part of the rollout.
  attended = [_relayout_attention(a, REGISTERS, rng, keep=0.6) for a in attns]
  other = analysis_testing.finalize(
      rollout, _sums(rollout, None, attended, REGISTERS, options), options)
  assert not np.allclose(other["rollout_entropy"], paper["rollout_entropy"], rtol=1e-5)
  for layout in (NO_CLS, NO_CLS_REGISTERS):
    rollout.check(_model(layout), rollout.OPTIONS)  # no refusal: mixed runs still run
    maps = [_relayout_attention(a, layout, rng) for a in attns]
    sums = _sums(rollout, None, maps, layout, options)
    assert set(sums) == {"count"}
    assert analysis_testing.finalize(rollout, sums, options) == {
        r.key: None for r in rollout.RESULTS}
  assert rollout.figures({"models": {"a": {r.key: None for r in rollout.RESULTS}}}, {}) == {}


# ----------------------------------------------------------------------------------- cka

def _cka(zs, layout, options=None):
  return analysis_testing.finalize(cka, _sums(cka, zs, None, layout, options), options)


def test_cka_on_every_layout_and_no_cls_kind_without_cls():
  rng = np.random.default_rng(2)
  zs = [(rng.normal(size=(30, 10, 12)) + rng.normal(size=12) * 2).astype(np.float32)
        for _ in range(7)]
  zs[4] = (0.6 * zs[2] + 0.4 * zs[4]).astype(np.float32)
  paper = _cka(zs, PAPER)
  mean_keys = ("cka_mean_tokens", "cka_unbiased_mean_tokens", "cka_adjacent")
  cls_keys = ("cka_cls", "cka_unbiased_cls")
  for layout in OTHER_LAYOUTS:
    got = _cka([_relayout_states(z, layout, rng) for z in zs], layout)
    for key in mean_keys + (cls_keys if layout.has_cls else ()):
      np.testing.assert_allclose(got[key], paper[key], rtol=1e-5, atol=1e-6,
                                 err_msg=f"{layout} {key}")
    if not layout.has_cls:
      assert all(got[key] is None for key in cls_keys)
  # The cls token is token 0 and the mean leaves the registers out: the features themselves.
  z = _relayout_states(zs[2], REGISTERS, rng)
  np.testing.assert_array_equal(cka.stage_feature(z, "cls", REGISTERS), zs[2][:, 0])
  np.testing.assert_allclose(cka.stage_feature(z, "mean_tokens", REGISTERS),
                             zs[2][:, 1:].mean(1), rtol=1e-6)


def test_cka_cls_only_is_refused_without_cls_and_mean_tokens_first_keeps_the_adjacent_curve():
  options = core.resolve_options(cka, {"features": "cls"})
  with pytest.raises(ClmimError, match="cka.features='cls': this model has no cls token"):
    cka.check(_model(NO_CLS, depth=3), options)
  cka.check(_model(REGISTERS, depth=3), options)
  cka.check(_model(NO_CLS, depth=3), cka.OPTIONS)  # both kinds asked: cls is left out
  rng = np.random.default_rng(3)
  zs = [rng.normal(size=(12, 5, 6)).astype(np.float32) for _ in range(5)]
  got = _cka(zs, NO_CLS, {"features": "cls,mean_tokens"})
  assert got["cka_cls"] is None and len(got["cka_adjacent"]) == 2
  assert np.isfinite(got["cka_adjacent"]).all()


# ---------------------------------------------------------------------- object_attention

def _object_sums(attns, masks, layout):
  batch = core.Batch([], [jnp.asarray(a) for a in attns], jnp.ones(len(masks)),
                     jnp.arange(len(masks), dtype=jnp.int32), 4,
                     labels=jnp.asarray(masks, jnp.int32), layout=layout)
  return {k: np.asarray(v, np.float64)
          for k, v in object_attention.attention_sums(batch).items()}


def test_object_attention_on_every_layout_and_no_cls_query_without_cls():
  rng = np.random.default_rng(4)
  attns = [_random_softmax(rng, 3, 2, 17) for _ in range(2)]
  masks = (rng.random(size=(3, 16)) < 0.4).astype(np.int32)
  masks[:, 0] = 1
  paper = _object_sums(attns, masks, PAPER)
  for layout in OTHER_LAYOUTS:
    got = _object_sums([_relayout_attention(a, layout, rng) for a in attns], masks, layout)
    for key in ("patches", "area", "masked_count") + (("cls",) if layout.has_cls else ()):
      np.testing.assert_allclose(got[key], paper[key], rtol=1e-5, err_msg=f"{layout} {key}")
    assert ("cls" in got) == layout.has_cls

  class Passes:  # `measure`'s passes: the one stage on the batch above
    def __init__(self, layout, maps):
      self.layout, self.maps = layout, maps
      self.cache = {("object token masks", 4, 0.5): masks}

    def run(self, stage, images, labels, context, desc):
      return _object_sums(self.maps, labels, self.layout)

  data = types.SimpleNamespace(evaluation=lambda: types.SimpleNamespace(images=None))
  options = object_attention.OPTIONS
  whole = object_attention.measure(_model(PAPER, patch_size=4), data, Passes(PAPER, attns),
                                   options)
  maps = [_relayout_attention(a, NO_CLS_REGISTERS, rng) for a in attns]
  without = object_attention.measure(_model(NO_CLS_REGISTERS, patch_size=4), data,
                                     Passes(NO_CLS_REGISTERS, maps), options)
  assert "object_attention_cls" in whole and "object_attention_cls" not in without
  np.testing.assert_allclose(without["object_attention_patches"],
                             whole["object_attention_patches"], rtol=1e-5)
  assert without["object_attention_details"] == pytest.approx(whole["object_attention_details"])


# ------------------------------------------------------------------ probing and robustness

DEPTH, WIDTH = 2, 8
_U = jnp.asarray(np.linspace(-1.0, 1.0, WIDTH), jnp.float32)


def _layout_forward(layout):
  """A stand-in model: every block outputs, from the image's first pixel x, the cls token
  2x + 1, image-dependent registers far from everything, and the patches x + u, x - u (mean x)."""
  def forward(params, images):
    x = images[:, 0, 0, :] * params["scale"]
    registers = [3 * jnp.roll(x, 1, -1) ** 2 + 5, -4 * x - 7][:layout.num_registers]
    tokens = ([2 * x + 1] if layout.has_cls else []) + registers + [x + _U, x - _U]
    return [jnp.stack(tokens, axis=1)] * (2 * DEPTH + 1), []
  return forward


class _Set:
  """What `ProbeData` hands a probe: images, labels, a description."""

  def __init__(self, features, labels):
    self.images = np.asarray(features, np.float32)[:, None, None, :]
    self.labels = Labels(("label",), np.asarray(labels, np.int64)[:, None],
                         {"label": tuple(str(i) for i in range(4))})
    self.description = f"{len(features)} test images"

  def column(self, name):
    return self.labels.values[:, 0]


class _Passes:
  """`clmim.analysis.session.Passes` on arrays for a model of token `layout`."""

  def __init__(self, forward, layout):
    self.cache, self.forward, self.layout = {}, forward, layout

  def run(self, stage, images, labels, context, desc):
    analyzer = runner.Analyzer(self.forward, [stage], 1, mesh=runner.make_mesh(jax.devices()[:2]),
                               device_batch_size=16, options={stage.NAME: stage.OPTIONS},
                               layout=self.layout)
    batches = (images[i:i + 32] for i in range(0, len(images), 32))
    return analyzer.run({"scale": jnp.ones(())}, batches, progress=False, labels=labels,
                        context=context)


def _blobs(n, seed, spread=1.2):
  rng = np.random.default_rng(seed)
  labels = rng.integers(4, size=n)
  return 3.0 * np.eye(WIDTH)[labels] + spread * rng.normal(size=(n, WIDTH)), labels


def test_probe_features_leave_registers_out_and_cls_is_refused_without_it():
  rng = np.random.default_rng(5)
  zs = [rng.normal(size=(5, 10, WIDTH)).astype(np.float32) for _ in range(2 * DEPTH + 1)]
  paper = probing.block_features([jnp.asarray(z) for z in zs])
  moved = [jnp.asarray(_relayout_states(z, REGISTERS, rng)) for z in zs]
  np.testing.assert_allclose(probing.block_features(moved, layout=REGISTERS), paper, rtol=1e-6,
                             atol=1e-6)
  no_cls = [jnp.asarray(_relayout_states(z, NO_CLS_REGISTERS, rng)) for z in zs]
  np.testing.assert_allclose(probing.layout_features(no_cls, NO_CLS_REGISTERS), paper[:, 1:],
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(ClmimError, match="no cls token"):
    probing.block_features(no_cls, kinds=("cls",), layout=NO_CLS_REGISTERS)
  assert probing.model_kinds(NO_CLS) == ("mean_tokens",)
  with pytest.raises(ClmimError, match="probing.features='cls': this model has no cls token"):
    probing.check(_model(NO_CLS), {**probing.OPTIONS, "features": "cls"})
  probing.check(_model(NO_CLS), probing.OPTIONS)
  probing.check(None, {**probing.OPTIONS, "features": "cls"})  # the paper's layout


@pytest.mark.slow
def test_probing_and_knn_on_every_layout_and_no_cls_results_without_cls():
  data = _Data(_Set(*_blobs(96, 20)), _Set(*_blobs(64, 21)))
  options = {**probing.OPTIONS, "cue_conflict": False, "knn_k": 5, "ridge_grid": (0.1,),
             "holdout_fraction": 0.0}
  results = {}
  for layout in (PAPER, REGISTERS, NO_CLS_REGISTERS):
    results[layout] = probing.measure(_model(layout), data,
                                      _Passes(_layout_forward(layout), layout), options)
  paper = results[PAPER]
  keys = [k for k in paper if k.startswith(("probe_", "knn_"))]
  assert sorted(keys) == ["knn_label_cls", "knn_label_mean_tokens", "probe_label_cls",
                          "probe_label_mean_tokens"]
  assert 0.3 < paper["probe_label_mean_tokens"][0] < 1  # overlapping classes: a real answer
  for key in keys:
    assert results[REGISTERS][key] == paper[key], key
  without = results[NO_CLS_REGISTERS]
  assert [k for k in without if k.startswith(("probe_", "knn_"))] == [
      "probe_label_mean_tokens", "knn_label_mean_tokens"]
  for key in ("probe_label_mean_tokens", "knn_label_mean_tokens"):
    assert without[key] == paper[key], key
  details = without["probing_details"]
  assert details["features"] == ["mean_tokens"]
  assert set(details["omitted_features"]) == {"cls"}
  assert "omitted_features" not in paper["probing_details"]
  assert details["targets"]["label"]["ridge"] == [
      [row[1]] for row in paper["probing_details"]["targets"]["label"]["ridge"]]


class _Images:
  """Evaluation images with the normalisation std robustness reads."""

  def __init__(self, array):
    self.array, self.std = array, np.full(3, 0.5, np.float32)

  def __len__(self):
    return len(self.array)

  def __getitem__(self, index):
    return self.array[index]


def _pixel_forward(layout):
  """Tokens from each image's mean pixel m (D = 3): cls 2m + 1, registers, patches m ± u."""
  u = jnp.asarray([0.5, -0.25, 1.0], jnp.float32)

  def forward(params, images):
    m = images.reshape(images.shape[0], -1, 3).mean(1) * params["scale"]
    registers = [m ** 2 * 3 + 5, -4 * m - 7][:layout.num_registers]
    tokens = ([2 * m + 1] if layout.has_cls else []) + registers + [m + u, m - u]
    return [jnp.stack(tokens, axis=1)] * (2 * DEPTH + 1), []
  return forward


@pytest.mark.slow
def test_robustness_on_every_layout_and_cls_refused_without_it():
  rng = np.random.default_rng(6)

  def pictures(n):
    labels = rng.integers(3, size=n)
    colours = np.eye(3)[labels] + 0.4 * rng.normal(size=(n, 3))
    return np.tile(colours[:, None, None, :], (1, 4, 4, 1)).astype(np.float32), labels

  train, evaluation = pictures(64), pictures(48)
  data = _Data(_Set(train[0][:, 0, 0, :], train[1]), _Set(evaluation[0][:, 0, 0, :],
                                                          evaluation[1]))
  data._train.images, data._evaluation.images = train[0], _Images(evaluation[0])
  options = {**robustness.OPTIONS, "bands": (0.3, 0.8), "band_width": 0.5,
             "white_rms": (0.3,), "ridge_grid": (0.1,), "holdout_fraction": 0.0}
  results = {}
  for layout, feature in ((PAPER, "mean_tokens"), (NO_CLS_REGISTERS, "mean_tokens"),
                          (PAPER, "cls"), (REGISTERS, "cls")):
    model = _model(layout, depth=DEPTH, image_size=4)
    chosen = {**options, "feature": feature}
    robustness.check(model, chosen)
    results[layout, feature] = robustness.measure(
        model, data, _Passes(_pixel_forward(layout), layout), chosen)
  for paper, other in (((PAPER, "mean_tokens"), (NO_CLS_REGISTERS, "mean_tokens")),
                       ((PAPER, "cls"), (REGISTERS, "cls"))):
    for key in ("robustness_clean_top1", "band_noise_drop", "white_noise_drop"):
      assert results[other][key] == results[paper][key], (other, key)
  assert 0.4 < results[PAPER, "mean_tokens"]["robustness_clean_top1"] <= 1
  with pytest.raises(ClmimError, match="robustness.feature='cls': model 'stand-in' has no cls"):
    robustness.check(_model(NO_CLS, depth=DEPTH, image_size=4), {**options, "feature": "cls"})


# ---------------------------------------------------------------------- between models

@pytest.mark.slow
def test_between_models_pairs_a_model_without_cls_with_a_cls_model():
  from clmim.analysis import between_models
  from clmim.models.vit import build_vit
  small = dict(image_size=8, depth=1, width=32, num_heads=2, mlp_dim=64)
  vit_a = build_vit("mu/4", class_token=False, num_registers=2, **small)
  vit_b = build_vit("mu/4", **small)
  images = jax.random.normal(jax.random.PRNGKey(2), (24, 8, 8, 3))
  params = [vit.init(jax.random.PRNGKey(i), images[:1])["params"]
            for i, vit in enumerate((vit_a, vit_b))]
  params = [jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x, p) for p in params]

  # The pairing: [pooled, patches] per stage, pooled = A's mean patch token, B's cls token.
  from clmim.models.vit import forward_with_states
  own_a, own_b = jax.jit(lambda p, x: [forward_with_states(vit, q, x)[0][0::2]
                                        for vit, q in zip((vit_a, vit_b), p)])(params, images)
  paired, attns = jax.jit(between_models._paired_forward(vit_a, vit_b))(params, images)
  assert len(paired) == 2 * 4 - 1 and attns == []
  for s in range(2):
    a, b = paired[2 * s], paired[2 * (2 + s)]
    assert a.shape == b.shape == (24, 5, 32)
    # Two compilations of one forward may round differently (~1e-6 of values ~10).
    close = dict(rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(a[:, 1:], own_a[s][:, 2:], **close)  # registers dropped
    np.testing.assert_allclose(a[:, 0], own_a[s][:, 2:].mean(1), **close)
    np.testing.assert_allclose(b, own_b[s], **close)  # a paper-layout model pairs unchanged
  z = own_b[0]
  assert between_models.paper_layout(z, core.TokenLayout()) is z  # not even copied

  class Session:  # the analysis job's session, on one device, without a plan
    def extra_analyzer(self, key, forward, modules, patch_size, options, folds=0, layout=None):
      return runner.Analyzer(forward, modules, patch_size, mesh=runner.make_mesh(
          jax.devices()[:1]), device_batch_size=12, options=options, layout=layout)

    def stream(self, analyzer, images, params, desc, quiet=False):
      return analyzer.run(params, (images.array[i:i + 12] for i in range(0, 24, 12)),
                          progress=False)

  seen = type("Images", (), {"array": images, "description": "24 test images",
                             "mean": (0.5,) * 3, "std": (0.5,) * 3,
                             "__len__": lambda self: 24})()
  models = [types.SimpleNamespace(name=name, family="mae", vit=vit, params=p)
            for name, vit, p in (("a", vit_a, params[0]), ("b", vit_b, params[1]))]
  options = {**cka.OPTIONS, "mutual_knn_k": 3, "mutual_knn_images": 20}
  pair = between_models.cka_between_models([(m, seen) for m in models], options,
                                           Session())["a ~ b"]
  assert pair["stages"] == [2, 2] and pair["num_images"] == 24
  assert pair["cls_feature"] == ["mean patch token (no cls token)", "cls token"]

  def reference(x, y):
    """Linear CKA from its definition, float64; NaN for a feature constant over the images (B's
    cls token at the embedding: the same learned token and position for every image)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(0), y - y.mean(0)
    if np.abs(x).max() < 1e-5 * np.abs(y).max() or np.abs(y).max() < 1e-5 * np.abs(x).max():
      return np.nan
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))

  for i in range(2):
    for j in range(2):
      a_mean, b_cls = own_a[i][:, 2:].mean(1), own_b[j][:, 0]
      np.testing.assert_allclose(pair["cka_cls"][i][j], reference(a_mean, b_cls), rtol=1e-4,
                                 atol=1e-6)
      np.testing.assert_allclose(pair["cka_mean_tokens"][i][j],
                                 reference(a_mean, own_b[j][:, 1:].mean(1)), rtol=1e-4,
                                 atol=1e-6)
  assert np.isnan(pair["cka_cls"][0][0]) and np.isfinite(pair["cka_cls"][1][1])
  assert pair["mutual_knn_images"] == 20 and len(pair["mutual_knn_cls"]) == 2


# ----------------------------------------------------------------------------- finetune

def _finetune_config(**fields):
  from config_fields import set_fields
  from configs import finetune as finetune_config
  config = finetune_config.get_config("runlocal")
  config.unlock()
  return set_fields(config, fields)


def test_finetune_refuses_cls_pooling_without_cls_and_mean_pools_patches_only():
  from clmim.train import finetune, objectives
  with pytest.raises(ClmimError, match=r"config.finetune.pool='cls': the encoder of "
                                       r"config.model has no cls token"):
    objectives.load(_finetune_config(**{"finetune.pool": "cls",
                                               "model.class_token": False}))
  objective = objectives.load(_finetune_config(**{"model.num_registers": 2}))
  assert objective.head.pool == "mean" and objective.head.prefix == 3
  assert objectives.load(_finetune_config(**{"model.class_token": False})).head.prefix == 0
  # Mean pooling over [cls, 2 registers, patches] is that over [cls, patches]: no registers.
  tokens = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 16))
  head = finetune.ClassifierHead(3, "mean", 0.5, prefix=3)
  params = head.init(jax.random.PRNGKey(1), tokens)
  paper = finetune.ClassifierHead(3, "mean", 0.5)
  np.testing.assert_allclose(head.apply(params, tokens),
                             paper.apply(params, jnp.concatenate([tokens[:, :1], tokens[:, 3:]],
                                                                 axis=1)), rtol=1e-6)
  assert finetune.layer_id("encoder/reg_token", 6) == finetune.layer_id("encoder/cls_token", 6)
