"""Spatial analyses on every token layout: register tokens and a missing cls token change nothing.

The spatial analyses (attention distance, NMI, Fourier, homogeneity, feature variance, image
spectrum, SVD, attention maps) are defined on the patch tokens only, their attention rows
renormalised over the patch keys. So a batch of paper-layout states (cls, then the g*g patches)
and the same batch re-laid out -- register tokens inserted after cls (attention mass moved onto
them, the other columns scaled down), or cls removed (rows renormalised) -- give the same
results. The decoder analysis is refused for any layout but the paper's.
"""
import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from analysis_testing import finalize, partial_sums
from clmim.analysis import (attention_distance, attention_maps, core, decoder, feature_variance,
                            fourier, homogeneity, image_spectrum, nmi, svd)
from clmim.errors import ClmimError

PAPER = core.TokenLayout()
LAYOUTS = [core.TokenLayout(3, True),   # cls + 2 registers
           core.TokenLayout(0, False),  # no cls, no registers (average-pooled models)
           core.TokenLayout(2, False)]  # 2 registers, no cls
GRID, WIDTH, HEADS, DEPTH, IMAGES = 4, 8, 2, 2, 4
N = GRID * GRID


def _softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _paper_batch(seed=0):
  """Paper-layout zs (2*DEPTH+1 states [b, 1+N, D]) and softmax attns ([b, h, 1+N, 1+N]),
  float64 numpy; the logits are scaled so that attention is far from uniform."""
  rng = np.random.default_rng(seed)
  zs = [rng.normal(size=(IMAGES, 1 + N, WIDTH)) + rng.normal(size=WIDTH)
        for _ in range(2 * DEPTH + 1)]
  attns = [_softmax(3 * rng.normal(size=(IMAGES, HEADS, 1 + N, 1 + N))) for _ in range(DEPTH)]
  return zs, attns


def _relayout(zs, attns, layout, seed=1):
  """The paper-layout batch laid out as `layout`: cls dropped (its column removed, rows
  renormalised) if `not layout.has_cls`; then `layout.num_registers` random register states
  inserted after the cls position, each kept row giving a random share r of its mass to the
  register columns (its other columns scaled by 1 - r); register query rows arbitrary."""
  rng = np.random.default_rng(seed)
  if not layout.has_cls:
    zs = [z[:, 1:] for z in zs]
    attns = [a[:, :, 1:, 1:] / a[:, :, 1:, 1:].sum(-1, keepdims=True) for a in attns]
  regs, at = layout.num_registers, int(layout.has_cls)
  new_zs = [np.concatenate([z[:, :at], 5 * rng.normal(size=(IMAGES, regs, WIDTH)), z[:, at:]],
                           axis=1) for z in zs]
  new_attns = []
  for a in attns:
    t = a.shape[-1]
    old = np.r_[0:at, at + regs:t + regs]  # where the old tokens go
    out = np.zeros(a.shape[:2] + (t + regs, t + regs))
    share = rng.uniform(0.05, 0.6, size=a.shape[:3] + (1,)) * (regs > 0)
    split = (rng.dirichlet(np.ones(regs), size=a.shape[:3]) if regs
             else np.zeros(a.shape[:3] + (0,)))
    rows = np.zeros(a.shape[:3] + (t + regs,))
    rows[..., old] = a * (1 - share)
    rows[..., at:at + regs] = share * split
    out[:, :, old] = rows
    out[:, :, at:at + regs] = _softmax(rng.normal(size=a.shape[:2] + (regs, t + regs)))
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-12)
    new_attns.append(out)
  return new_zs, new_attns


def _f32(arrays):
  return [jnp.asarray(a, jnp.float32) for a in arrays]


def _results(module, zs, attns, layout, options=None):
  sums = partial_sums(module, _f32(zs), _f32(attns), np.ones(IMAGES), patch_size=4,
                      options=options, layout=layout)
  return finalize(module, sums, options)


def _assert_same(got, want, path="results"):
  """Nested results (dicts, lists, floats) equal to ~1e-5."""
  if isinstance(want, dict):
    assert set(got) == set(want), path
    for key in want:
      _assert_same(got[key], want[key], f"{path}[{key!r}]")
  else:
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                               rtol=1e-5, atol=1e-6, err_msg=path)


MODULES = [
    (attention_distance, None), (nmi, None), (fourier, None), (homogeneity, None),
    (feature_variance, None), (feature_variance, {"normalize": True}), (image_spectrum, None),
    (svd, {"images": (0, 2), "block": 1}), (svd, {"method": "gram", "centre": False}),
    (attention_maps, {"images": (1, 3), "blocks": (1, 2), "heads": "mean"}),
]


@pytest.fixture(scope="module")
def batches():
  """{layout: (zs, attns)} for the paper's layout and every layout of LAYOUTS."""
  zs, attns = _paper_batch()
  out = {PAPER: (zs, attns)}
  for layout in LAYOUTS:
    out[layout] = _relayout(zs, attns, layout)
  return out


@pytest.mark.parametrize("module, options", MODULES,
                         ids=[f"{m.NAME}-{o}" if o else m.NAME for m, o in MODULES])
def test_patch_analyses_ignore_registers_and_cls(batches, module, options):
  """Every spatial analysis gives the paper layout's results on every other layout; none reads
  cls, so a model without one is analysed like any other (no error, nothing omitted)."""
  want = _results(module, *batches[PAPER], PAPER, options)
  for layout in LAYOUTS:
    got = _results(module, *batches[layout], layout, options)
    _assert_same(got, want, f"{module.NAME} on {layout}")


def test_registers_change_the_result_when_read_as_patches(batches):
  """The test has teeth: the registered batch read with the paper's layout is not square."""
  zs, attns = batches[core.TokenLayout(3, True)]
  with pytest.raises(ClmimError, match="cls and register tokens excluded"):
    _results(attention_distance, zs, attns, PAPER)
  # A no-cls batch read as the paper's loses a patch to the would-be cls: 15, not square.
  zs, attns = batches[core.TokenLayout(0, False)]
  with pytest.raises(ClmimError, match="15 patch tokens"):
    _results(fourier, zs, attns, PAPER)


def test_helpers_take_a_layout(batches):
  """The bare-array helpers read `layout` and default to the paper's."""
  zs, attns = batches[PAPER]
  layout = core.TokenLayout(3, True)
  rzs, rattns = batches[layout]
  a, ra = jnp.asarray(attns[0], jnp.float32), jnp.asarray(rattns[0], jnp.float32)
  z, rz = jnp.asarray(zs[2], jnp.float32), jnp.asarray(rzs[2], jnp.float32)
  for want, got in [(nmi.per_image(a), nmi.per_image(ra, layout)),
                    ((homogeneity.unit_rows(a),), (homogeneity.unit_rows(ra, layout),)),
                    ((fourier.log_amplitude(z),), (fourier.log_amplitude(rz, layout),)),
                    ((feature_variance.spatial_variance(z),),
                     (feature_variance.spatial_variance(rz, layout=layout),))]:
    for w, g in zip(want, got):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(attention_maps.query_attention_map(rattns[0], 2, 1, layout),
                             attention_maps.query_attention_map(attns[0], 2, 1), rtol=1e-12)


def test_nmi_guess_is_one_without_prefix_tokens(batches):
  """Without cls or registers, the patch rows of a softmax already sum to 1 (s~ = 1)."""
  zs, attns = batches[core.TokenLayout(0, False)]
  a = jnp.asarray(attns[1], jnp.float32)
  got = nmi.per_image(a, core.TokenLayout(0, False))
  want = nmi.per_image(jnp.asarray(batches[PAPER][1][1], jnp.float32))
  for g, w in zip(got, want):
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def _fake_model(layout, decoder_spec=None, name="m"):
  vit = types.SimpleNamespace(num_prefix_tokens=layout.prefix, class_token=layout.has_cls,
                              grid=GRID, patch_size=4, image_size=4 * GRID)
  return types.SimpleNamespace(name=name, vit=vit, decoder=decoder_spec)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_decoder_check_refuses_other_layouts(layout):
  options = core.resolve_options(decoder, {"input": "unmasked"})
  with pytest.raises(ClmimError, match=r"model 'dinov2-reg'.*paper's token layout"):
    decoder.check(_fake_model(layout, {"kind": "mae"}, "dinov2-reg"), options)
  # Without a decoder the usual message, whatever the layout.
  with pytest.raises(ClmimError, match="has no decoder"):
    decoder.check(_fake_model(layout), options)
  decoder.check(_fake_model(PAPER, {"kind": "mae"}), options)  # the paper's layout passes


def test_decoder_reads_its_states_with_the_paper_layout(batches):
  """The decoder's states always have the paper's layout, whatever `batch.layout` says."""
  zs, attns = batches[PAPER]
  dzs, dattns = _f32(zs[:3]), _f32(attns[:1])
  weights = jnp.ones(IMAGES, jnp.float32)
  index = jnp.arange(IMAGES, dtype=jnp.int32)
  base = core.Batch(_f32(zs), _f32(attns), weights, index, 4, decoder_zs=dzs,
                    decoder_attns=dattns)
  layout = core.TokenLayout(3, True)
  rzs, rattns = batches[layout]
  other = dataclasses.replace(base, zs=_f32(rzs), attns=_f32(rattns), layout=layout)
  want = jax.tree.map(np.asarray, decoder.partial_sums(base, {}))
  got = jax.tree.map(np.asarray, decoder.partial_sums(other, {}))
  for key in ("decoder_fourier", "nmi_sum", "encoder_fourier"):
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6),
                 got[key], want[key])
