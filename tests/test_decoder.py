"""The `decoder` analysis: MAE / SimMIM decoders loaded with `?decoder=1`, their states against a
PyTorch reference, the analysis against float64 numpy definitions, exactness through the runner,
and the errors for models and files without a decoder."""
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clmim.analysis import core, decoder, fourier, plots, runner
from clmim.checkpoints import native, registry
from clmim.data.synthetic import ShapesTextures
from clmim.errors import ClmimError
from clmim.jobs import analyze, report
from clmim.models import heads, masking
from clmim.models.vit import vit_fields
from clmim.train import objectives, trainer
from clmim.train.common import build_encoder
from configs import analyze as all_config
from configs import pretrain_mae, pretrain_simmim

torch = pytest.importorskip("torch")

import test_converters_parity as tcp  # noqa: E402  (its PyTorch reference modules)

DEC_WIDTH, DEC_HEADS, DEC_DEPTH, DEC_MLP = 32, 16, 2, 64  # MAE decoders always have 16 heads
NUM_IMAGES = 16


class MAE(tcp.TorchViT):
  """An MAE with a small decoder, in models_mae.py's parameter names."""

  def __init__(self):
    super().__init__(pos=tcp._sincos(tcp.GRID, tcp.WIDTH, row_first=False))
    self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, DEC_WIDTH))
    self.decoder_embed = torch.nn.Linear(tcp.WIDTH, DEC_WIDTH)
    self.decoder_pos_embed = torch.nn.Parameter(tcp._sincos(tcp.GRID, DEC_WIDTH, False),
                                                requires_grad=False)
    self.decoder_blocks = torch.nn.ModuleList(
        [tcp.TorchBlock(DEC_WIDTH, DEC_HEADS, DEC_MLP, False) for _ in range(DEC_DEPTH)])
    self.decoder_norm = torch.nn.LayerNorm(DEC_WIDTH, eps=1e-6)
    self.decoder_pred = torch.nn.Linear(DEC_WIDTH, tcp.PATCH * tcp.PATCH * 3)

  def states(self, images):
    """(encoder zs, decoder zs, decoder attns, pred) on full (unmasked) images."""
    latent, zs, _ = self(images)
    x = self.decoder_embed(latent) + self.decoder_pos_embed
    dzs, dattns = [x], []
    for block in self.decoder_blocks:
      x, x1, attn = block(x)
      dzs += [x1, x]
      dattns.append(attn)
    return zs, dzs, dattns, self.decoder_pred(self.decoder_norm(x))


class TorchSimMIM(torch.nn.Module):
  """SimMIM's layout: a BEiT-style encoder with a mask token, a 1x1 conv + pixel shuffle head."""

  def __init__(self):
    super().__init__()
    self.encoder = tcp.TorchViT(beit=True, mask_token=True)
    self.decoder = torch.nn.Sequential(
        torch.nn.Conv2d(tcp.WIDTH, tcp.PATCH ** 2 * 3, 1), torch.nn.PixelShuffle(tcp.PATCH))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  folder = tmp_path_factory.mktemp("mae")
  mae = tcp._randomize(MAE(), 11)
  full = str(folder / "mae_pretrain_vit_base_full.pth")
  torch.save({"model": mae.state_dict()}, full)
  # The encoder-only release: the same encoder, no decoder tensors.
  plain = str(folder / "mae_pretrain_vit_base.pth")
  torch.save({"model": {k: v for k, v in mae.state_dict().items()
                        if not k.startswith(("decoder_", "mask_token"))}}, plain)
  return mae, full, plain


@pytest.fixture(scope="module")
def model(files):
  return registry.resolve(f"{files[1]}?decoder=1&num_heads={tcp.HEADS}")


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).normal(
      size=(NUM_IMAGES, tcp.IMAGE, tcp.IMAGE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def torch_states(files, images):
  with torch.no_grad():
    zs, dzs, dattns, pred = files[0].states(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  as64 = lambda xs: [x.numpy().astype(np.float64) for x in xs]
  return as64(zs), as64(dzs), as64(dattns), pred.numpy()


def _forward(model):
  d = model.decoder
  return functools.partial(heads.forward_with_decoder, model.vit, d["kind"], d["config"])


def _params(model):
  return {"encoder": model.params, "decoder": model.decoder["params"]}


@pytest.fixture(scope="module")
def analyzer8(model):
  return runner.Analyzer(_forward(model), [decoder], tcp.PATCH, device_batch_size=2)


@pytest.fixture(scope="module")
def reference(analyzer8, model, images):
  return analyzer8.run(_params(model), [images], progress=False)


def _delta_log_amplitude(states):
  """fourier's definition in float64 numpy: ΔlogA along the centred diagonal, per state."""
  rows = []
  for z in states:
    b, t, c = z.shape
    g = int(round(np.sqrt(t - 1)))
    maps = z[:, 1:].reshape(b, g, g, c)
    f = np.log(np.abs(np.fft.fft2(maps, axes=(1, 2))) + 1e-6).mean(axis=(0, 3))
    f = np.roll(f, (g // 2, g // 2), axis=(0, 1))
    diag = np.diagonal(f)[g // 2:]
    rows.append(diag - diag[0])
  return np.array(rows)


def _nmi(attn):
  """NMI per head, averaged over images, from the definition (docs/definitions.md)."""
  a = attn[:, :, 1:, 1:] + 1e-8
  a = a / a.sum(-1, keepdims=True)
  n = a.shape[-1]
  p_key = a.mean(-2)  # [B, H, N]
  mutual = (a * np.log(a / p_key[..., None, :])).sum(-1).mean(-1)
  h_key = -(p_key * np.log(p_key)).sum(-1)
  return (mutual / np.sqrt(np.log(n) * h_key)).mean(0)


def test_decoder_params_and_states_match_torch(model, files, images, torch_states):
  assert model.decoder["kind"] == "mae" and model.info["decoder"]["depth"] == DEC_DEPTH
  assert model.decoder["config"] == {"width": DEC_WIDTH, "depth": DEC_DEPTH,
                                     "num_heads": DEC_HEADS, "mlp_dim": DEC_MLP,
                                     "patch_size": tcp.PATCH}
  # MaeDecoder's parameter tree is exactly the converter's.
  module = heads.MaeDecoder(**model.decoder["config"])
  latent = jnp.zeros((1, tcp.GRID ** 2 + 1, tcp.WIDTH))
  expected = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), latent))["params"]
  assert jax.tree.map(lambda x: x.shape, expected) == \
      jax.tree.map(lambda x: x.shape, model.decoder["params"])
  # The encoder is what the spec without ?decoder=1 gives.
  plain = registry.resolve(f"{files[1]}?num_heads={tcp.HEADS}")
  assert plain.decoder is None and plain.vit == model.vit
  zs, attns, dzs, dattns = jax.jit(_forward(model))(_params(model), images)
  ref_zs, ref_dzs, ref_dattns, ref_pred = torch_states
  assert len(dzs) == 2 * DEC_DEPTH + 1 and len(dattns) == DEC_DEPTH
  for i, (got, want) in enumerate(zip(dattns, ref_dattns)):
    assert float(np.abs(np.asarray(got) - want).max()) <= 1e-5, f"decoder block {i}"
  for i, (got, want) in enumerate(zip(list(zs) + list(dzs), ref_zs + ref_dzs)):
    err = float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())
    assert err <= 1e-4, f"state {i}: relative error {err}"
  # Jitted, as the analysis runs them (op by op, each operation compiles on its own: ~1.5 s).
  latent = jax.jit(model.vit.apply)({"params": model.params}, images)
  pred = jax.jit(module.apply)({"params": model.decoder["params"]}, latent)
  np.testing.assert_allclose(np.asarray(pred), ref_pred, atol=1e-4 * np.abs(ref_pred).max())


def test_results_match_the_float64_definitions(reference, torch_states):
  ref_zs, ref_dzs, ref_dattns, _ = torch_states
  assert reference["num_images"] == NUM_IMAGES
  # The JAX states match torch's to ~1e-5 relative (float32 matmuls in another order), and log
  # amplitudes of small high-frequency components amplify that: 1e-4 here, as for the states; a
  # wrong read-out would be off by far more (~0.1).
  decoder_fourier = _delta_log_amplitude(ref_dzs)[0::2]  # blocks' input, then each block
  np.testing.assert_allclose(reference["decoder_fourier"], decoder_fourier, atol=1e-4)
  assert np.shape(reference["decoder_fourier"]) == (DEC_DEPTH + 1, tcp.GRID // 2)
  encoder_fourier = _delta_log_amplitude(ref_zs)[0::2]
  np.testing.assert_allclose(reference["encoder_decoder_fourier"],
                             np.concatenate([encoder_fourier[:, -1], decoder_fourier[:, -1]]),
                             atol=1e-4)
  np.testing.assert_allclose(reference["decoder_nmi"], [_nmi(a) for a in ref_dattns],
                             atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 7])
def test_batch_size_invariance(analyzer8, reference, model, images, batch_size):
  batches = [images[i:i + batch_size] for i in range(0, NUM_IMAGES, batch_size)]
  got = analyzer8.run(_params(model), batches, progress=False)
  for key in decoder.RESULTS:
    np.testing.assert_array_equal(got[key.key], reference[key.key], err_msg=key.key)
  assert analyzer8.compilations == 1


def test_one_device_vs_eight(reference, model, images):
  mesh = runner.make_mesh(jax.devices()[:1])
  got = runner.Analyzer(_forward(model), [decoder], tcp.PATCH, mesh=mesh,
                        device_batch_size=2).run(_params(model), [images], progress=False)
  for result in decoder.RESULTS:
    # Another device batch size rounds float32 differently (~1e-6, see runner.Analyzer).
    np.testing.assert_allclose(got[result.key], reference[result.key], rtol=1e-5, atol=1e-6,
                               err_msg=result.key)


@pytest.mark.slow
def test_analysis_job_end_to_end_and_refusals(files, tmp_path):
  config = all_config.get_config("runlocal")
  config.models = f"{files[1]}?decoder=1&num_heads={tcp.HEADS}&name=mae"
  config.analyses = "decoder,fourier"
  config.include_untrained = True  # the untrained copy gets an untrained decoder
  config.progress = False
  config.data.num_images = 8
  config.batch_size = 8
  results = analyze.run(config, str(tmp_path / "out"))
  assert results["compilations"] == 1  # the copy shares the step
  mae, untrained = results["models"]["mae"], results["models"]["mae (untrained)"]
  # decoder's encoder half is fourier's curve, computed by the same function.
  np.testing.assert_array_equal(mae["encoder_decoder_fourier"][:tcp.DEPTH + 1],
                                [row[-1] for row in mae["fourier"]])
  assert mae["decoder_fourier"] != untrained["decoder_fourier"]
  assert {"decoder.png", "decoder_fourier.png", "decoder_nmi.png"} <= set(results["figures"])
  assert results["model_info"]["mae"]["decoder"]["kind"] == "mae"

  # A model without a decoder: one line from `check`, before any compute or output.
  config.models = f"{files[2]}?num_heads={tcp.HEADS}"
  config.include_untrained = False
  with pytest.raises(ClmimError) as error:
    analyze.run(config, str(tmp_path / "refused"))
  message = str(error.value)
  assert "\n" not in message and "has no decoder" in message and "'?decoder=1'" in message
  assert not (tmp_path / "refused").exists()


def test_decoder_option_errors(files):
  with pytest.raises(ClmimError) as error:
    registry.resolve(f"{files[2]}?decoder=1&num_heads={tcp.HEADS}")
  assert "\n" not in str(error.value) and files[2] in str(error.value)
  assert "has none" in str(error.value)
  with pytest.raises(ClmimError, match="unknown option 'decoder'"):
    registry.resolve("random:mu/4?decoder=1")


def test_simmim_decoder_is_its_pixel_head(tmp_path, images):
  simmim = tcp._randomize(TorchSimMIM(), 12)
  path = str(tmp_path / "simmim_pretrain__vit_base__img224__800ep.pth")
  torch.save({"model": simmim.state_dict()}, path)
  model = registry.resolve(f"simmim:{path}?decoder=1")
  assert model.decoder["kind"] == "simmim" and not model.vit.use_mask_token
  assert "mask_token" not in model.params and "mask_token" in model.decoder
  assert model.decoder["training_mask"] == {"ratio": 0.6, "patch_px": 32}
  decoder.check(model, core.resolve_options(decoder, None))
  few = images[:4]
  _, _, dzs, dattns = jax.jit(_forward(model))(_params(model), few)
  assert len(dzs) == 1 and not dattns
  with torch.no_grad():
    tokens, _, _ = simmim.encoder(torch.from_numpy(few.transpose(0, 3, 1, 2)))
    grid = tokens[:, 1:].transpose(1, 2).reshape(len(few), tcp.WIDTH, tcp.GRID, tcp.GRID)
    pixels = simmim.decoder(grid).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(
      np.asarray(tcp.unpatchify(dzs[0][:, 1:], tcp.PATCH, tcp.GRID)), pixels,
      atol=1e-4 * np.abs(pixels).max())
  out = runner.Analyzer(_forward(model), [decoder], tcp.PATCH, device_batch_size=1).run(
      _params(model), [few], progress=False)
  assert out["decoder_nmi"] == [] and len(out["decoder_fourier"]) == 1
  reference = _delta_log_amplitude([np.concatenate(
      [np.zeros((len(few), 1, tcp.PATCH ** 2 * 3)),
       heads.patchify(pixels.astype(np.float64), tcp.PATCH)], axis=1)])
  np.testing.assert_allclose(out["decoder_fourier"], reference, atol=1e-4)  # JAX vs torch
  # The shared figures and the summary tables cope with the empty decoder_nmi.
  results = {"models": {"simmim": out}, "model_info": {"simmim": {"family": "mim"}}}
  figures = plots.analysis_figures(results, decoder, {})
  assert set(figures) == {"decoder.png", "decoder_fourier.png"}
  assert any("NMI (decoder)" in title for title, _, _ in report.curve_tables(results, [decoder]))
  untrained = registry.resolve(f"random:simmim:{path}?decoder=1")
  assert jax.tree.structure(untrained.decoder["params"]) == \
      jax.tree.structure(model.decoder["params"])
  assert not np.allclose(untrained.decoder["params"]["linear"]["kernel"],
                         model.decoder["params"]["linear"]["kernel"])


def test_check_names_the_model():
  plain = registry.Model(name="moco", family="cl", vit=None, params=None, preprocessing={},
                         source="", info={})
  with pytest.raises(ClmimError, match=r"^model 'moco' has no decoder: load an MAE / SimMIM "
                                       r"export of clmim \('runs/<run>/export\?decoder=1'\) "
                                       r"or an official MAE _full/visualize or SimMIM "
                                       r"checkpoint with '\?decoder=1'\.$"):
    decoder.check(plain, core.resolve_options(decoder, None))
  assert fourier.NAME in core.available() and decoder.NAME in core.available()


# --- clmim's own exports: the pretraining decoder kept beside the encoder ------------------------

def _export(module, path, seed=0):
  """An export of `module`'s runlocal objective with random params, decoder included, written
  as the trainer writes it (trained exports: test_mae.py, test_train.py); returns (objective,
  params). The params are drawn in numpy at the objective's shapes: nothing compiles."""
  config = module.get_config("runlocal")
  objective = objectives.load(config)
  shapes = jax.eval_shape(objective.init, jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))[0]
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda x: rng.normal(0, 0.1, x.shape).astype(np.float32), shapes)
  native.save(str(path), config, objective.encoder_params(params, {}),
              vit_fields(objective.encoder), steps=0,
              decoder=trainer.pretraining_decoder(objective, params))
  return objective, params


@pytest.mark.parametrize("module, kind, key", [(pretrain_mae, "mae", "decoder"),
                                               (pretrain_simmim, "simmim", "head")])
def test_an_export_keeps_its_decoder_and_decoder_1_loads_it(tmp_path, module, kind, key):
  path = tmp_path / "export"
  objective, params = _export(module, path)
  manifest = json.loads((path / "manifest.json").read_text())
  assert manifest["decoder"]["kind"] == kind and (path / manifest["decoder"]["file"]).exists()
  assert registry.resolve(str(path)).decoder is None  # without the option: the encoder alone
  model = registry.resolve(f"{path}?decoder=1")
  assert model.decoder["kind"] == kind and model.info["decoder"]["kind"] == kind
  jax.tree.map(np.testing.assert_array_equal, model.decoder["params"], params[key])
  # The module the analysis runs is the one the objective trained (same fields, same params).
  assert heads.decoder_module(kind, model.decoder["config"]) == getattr(objective, key)
  # The masks its pretraining drew, from its manifest: the masked feed's defaults.
  section = module.get_config("runlocal")[kind]
  assert model.decoder["training_mask"] == {
      "ratio": section.mask_ratio, "patch_px": section.mask_patch if kind == "simmim" else None}
  assert ("mask_token" in model.decoder) == (kind == "simmim")
  decoder.check(model, core.resolve_options(decoder, None))


def test_the_decoder_analysis_runs_on_a_simmim_export(tmp_path):
  """(On a trained MAE export, through the analysis job: test_mae.py.)"""
  _export(pretrain_simmim, tmp_path / "export")
  model = registry.resolve(f"{tmp_path / 'export'}?decoder=1")
  images = ShapesTextures(32, "validation", 8, version=3).batch(range(8))["image"] - 0.5
  out = runner.Analyzer(_forward(model), [decoder], 4, device_batch_size=1).run(
      _params(model), [images], progress=False)
  assert np.shape(out["decoder_fourier"]) == (1, 4) and out["decoder_nmi"] == []
  assert len(out["encoder_decoder_fourier"]) == 2 + 1 + 1  # embedding, 2 blocks, the head
  assert np.isfinite(out["encoder_decoder_fourier"]).all()


def test_exports_without_a_decoder_say_how_to_get_one(tmp_path):
  # The shipped demo checkpoints hold the encoder only: one line, no "unknown option".
  with pytest.raises(ClmimError) as error:
    registry.resolve("simmim_demo?decoder=1")
  message = str(error.value)
  assert "\n" not in message and "unknown option" not in message
  assert "the shipped simmim_demo holds only its encoder" in message
  assert "configs/pretrain_simmim.py" in message and "export?decoder=1" in message
  with pytest.raises(ClmimError, match="a moco_v3 model has none"):
    registry.resolve("moco_v3_demo?decoder=1")
  # An export written before decoders were kept loads as before; ?decoder=1 says re-export.
  old = tmp_path / "old"
  config = pretrain_simmim.get_config("runlocal")
  encoder = build_encoder(config)
  shapes = jax.eval_shape(encoder.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  native.save(str(old), config, jax.tree.map(lambda x: np.ones(x.shape, np.float32),
                                             shapes["params"]),
              vit_fields(encoder), steps=0, invocation={"workdir": "runs/old"})
  assert registry.resolve(str(old)).decoder is None
  with pytest.raises(ClmimError, match=r"this export holds only the encoder .* "
                                       r"--config.mode=export --workdir runs/old"):
    registry.resolve(f"{old}?decoder=1")


def test_a_corrupt_or_misshapen_kept_decoder_is_one_line(tmp_path):
  path = tmp_path / "export"
  _export(pretrain_simmim, path)
  manifest = json.loads((path / "manifest.json").read_text())
  manifest["decoder"]["config"]["patch_size"] = 8  # the file's head is for patch 4
  (path / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(ClmimError, match=r"\(decoder\)' does not fit its model: wrong shapes"):
    registry.resolve(f"{path}?decoder=1")
  (path / "decoder.npz").write_bytes(b"PK\x03\x04 truncated")
  with pytest.raises(ClmimError, match="decoder.npz' are corrupt"):
    registry.resolve(f"{path}?decoder=1")


# --- the decoder fed as in pretraining (input="masked", the default) -----------------------------

def _masked_forward(model, **feed):
  d = model.decoder
  forward = functools.partial(heads.forward_with_decoder, model.vit, d["kind"], d["config"],
                              feed={"patch": 0, "seed": 0, **feed})
  forward.takes_index = True
  return forward


def test_masked_mae_feed_matches_torch_and_masks_three_quarters(files, model, images):
  mae = files[0]
  assert model.decoder["training_mask"] == {"ratio": 0.75, "patch_px": None}
  feed = decoder.feed(model, core.resolve_options(decoder, None))
  assert feed == {"ratio": 0.75, "patch": 0, "seed": 0}
  index = jnp.arange(NUM_IMAGES, dtype=jnp.int32)
  tokens = tcp.GRID ** 2
  keep, mask = masking.per_image(lambda k: masking.random_keep(k, 1, tokens, 0.75), 0, index)
  keep, mask = np.array(keep), np.array(mask)
  assert (mask.sum(1) == tokens - tokens // 4).all()  # 12 of 16 masked in every image
  assert len({tuple(row) for row in keep}) > 1  # each image its own draw
  _, _, dzs, dattns = jax.jit(_masked_forward(model, ratio=0.75))(_params(model), images, index)
  with torch.no_grad():  # MAE's forward_encoder + forward_decoder with these kept patches
    x = mae.patch_embed.proj(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    x = x.flatten(2).transpose(1, 2) + mae.pos_embed[:, 1:]
    visible = torch.gather(x, 1, torch.from_numpy(keep).long()[..., None].expand(-1, -1,
                                                                                 tcp.WIDTH))
    cls = (mae.cls_token + mae.pos_embed[:, :1]).expand(NUM_IMAGES, -1, -1)
    h = torch.cat([cls, visible], 1)
    for block in mae.blocks:
      h, _, _ = block(h)
    h = mae.decoder_embed(mae.norm(h))
    full = mae.mask_token.expand(NUM_IMAGES, tokens, -1).clone()
    for i in range(NUM_IMAGES):
      full[i, keep[i]] = h[i, 1:]
    y = torch.cat([h[:, :1], full], 1) + mae.decoder_pos_embed
    ref_dzs, ref_attns = [y], []
    for block in mae.decoder_blocks:
      y, y1, attn = block(y)
      ref_dzs += [y1, y]
      ref_attns.append(attn)
  for got, want in zip(dzs, ref_dzs):
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=2e-4 * float(want.abs().max()))
  for got, want in zip(dattns, ref_attns):
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=2e-5)


@pytest.mark.slow
def test_masked_results_do_not_depend_on_batching_or_devices(model, images):
  forward, params = _masked_forward(model, ratio=0.75), _params(model)
  runs = []
  for devices, size, batch in ((8, 2, 16), (1, 3, 5), (4, 1, 7)):
    mesh = runner.make_mesh(jax.devices()[:devices])
    out = runner.Analyzer(forward, [decoder], tcp.PATCH, mesh=mesh, device_batch_size=size).run(
        params, (images[i:i + batch] for i in range(0, NUM_IMAGES, batch)), progress=False)
    runs.append(out)
  for out in runs[1:]:
    np.testing.assert_allclose(out["decoder_fourier"], runs[0]["decoder_fourier"], atol=1e-5)
    np.testing.assert_allclose(out["decoder_nmi"], runs[0]["decoder_nmi"], atol=1e-6)


def test_masked_simmim_feed_is_the_encoder_with_mask_tokens(tmp_path, images):
  simmim = tcp._randomize(TorchSimMIM(), 13)
  path = str(tmp_path / "simmim_pretrain__vit_base__img224__800ep.pth")
  torch.save({"model": simmim.state_dict()}, path)
  model = registry.resolve(f"simmim:{path}?decoder=1")
  options = {**core.resolve_options(decoder, None), "mask_patch": 16}
  feed = decoder.feed(model, options)
  assert feed == {"ratio": 0.6, "patch": 2, "seed": 0}
  few, index = images[:4], jnp.arange(4, dtype=jnp.int32)
  mask = np.asarray(masking.per_image(
      lambda k: masking.block_masks(k, 1, tcp.GRID, 2, 0.6), 0, index))
  assert (mask.sum(1) == 12).all()  # ceil(0.6 * 4) of the four 2x2 blocks
  params = {**_params(model), "mask_token": model.decoder["mask_token"]}
  _, _, dzs, _ = jax.jit(_masked_forward(model, ratio=0.6, patch=2))(params, few, index)
  encoder = simmim.encoder
  with torch.no_grad():
    x = encoder.patch_embed.proj(torch.from_numpy(few.transpose(0, 3, 1, 2)))
    x = x.flatten(2).transpose(1, 2)
    x = torch.where(torch.from_numpy(mask)[..., None], encoder.mask_token, x)
    x = torch.cat([encoder.cls_token.expand(len(few), -1, -1), x], 1)
    for block in encoder.blocks:
      x, _, _ = block(x, encoder.rel_pos_bias())
    grid = encoder.norm(x)[:, 1:].transpose(1, 2).reshape(len(few), tcp.WIDTH, tcp.GRID,
                                                           tcp.GRID)
    pixels = simmim.decoder(grid).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(tcp.unpatchify(dzs[0][:, 1:], tcp.PATCH, tcp.GRID)),
                             pixels, atol=1e-4 * np.abs(pixels).max())


@pytest.mark.slow
def test_masked_is_the_job_default_and_bad_feeds_are_refused(files, tmp_path):
  config = all_config.get_config("runlocal")
  config.models = f"{files[1]}?decoder=1&num_heads={tcp.HEADS}&name=mae"
  config.analyses = "decoder"
  config.include_untrained = False
  config.progress = False
  config.data.num_images = 8
  config.batch_size = 8
  masked = analyze.run(config, str(tmp_path / "masked"))["models"]["mae"]
  config.analysis_options.decoder.input = "unmasked"
  unmasked = analyze.run(config, str(tmp_path / "unmasked"))["models"]["mae"]
  assert masked["decoder_fourier"] != unmasked["decoder_fourier"]
  # The encoder's half is the unmasked image's either way.
  assert masked["encoder_decoder_fourier"][:tcp.DEPTH + 1] == \
      unmasked["encoder_decoder_fourier"][:tcp.DEPTH + 1]
  for field, value, expected in (("input", "half", "expected one of masked, unmasked"),
                                 ("mask_ratio", 1.5, "expected a share in (0, 1)"),
                                 ("mask_ratio", 0.99, "keeps no patch of 16")):
    config.analysis_options.decoder.input = "masked"
    config.analysis_options.decoder.mask_ratio = 0.0
    setattr(config.analysis_options.decoder, field, value)
    with pytest.raises(ClmimError, match=rf"decoder\.{field}=.*{re.escape(expected)}"):
      analyze.run(config, str(tmp_path / f"refused_{field}"))
    assert not (tmp_path / f"refused_{field}").exists()
