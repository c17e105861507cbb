"""Pretraining: objective pieces with known answers, and short real runs of the trainer."""
import importlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clmim import preflight
from clmim.checkpoints import native, registry
from clmim.data import synthetic
from clmim.errors import ClmimError
from clmim.jobs import export as export_job
from clmim.jobs import pretrain, snapshots
from clmim.train import moco_v3, objectives, simmim, tensorboard, trainer
from configs import pretrain_moco_v3, pretrain_simmim


def test_block_masks_have_exact_ratio_and_block_structure():
  masks = np.asarray(simmim.block_masks(jax.random.PRNGKey(0), 32, 8, 2, 0.6))
  assert masks.shape == (32, 64)
  assert (masks.sum(1) == 10 * 4).all()  # ceil(0.6 * 16) blocks of 2x2 tokens
  grid = masks.reshape(32, 4, 2, 4, 2)
  assert (grid == grid[:, :, :1, :, :1]).all()  # constant inside each block
  assert not (masks == masks[0]).all()          # random per image


def test_contrastive_loss_known_answers():
  keys = jax.random.normal(jax.random.PRNGKey(0), (16, 8))
  # Perfectly aligned pairs at a low temperature: loss -> 0.
  assert float(moco_v3.contrastive_loss(keys * 5, keys, 0.01)) < 1e-3
  # Identical embeddings for everything: uniform logits, loss = log(B) * 2 tau.
  same = jnp.ones((16, 8))
  np.testing.assert_allclose(float(moco_v3.contrastive_loss(same, same, 0.2)),
                             np.log(16) * 0.4, rtol=1e-5)


def test_momentum_schedule_endpoints():
  assert float(moco_v3.momentum_at(0, 100, 0.96)) == pytest.approx(0.96)
  assert float(moco_v3.momentum_at(50, 100, 0.96)) == pytest.approx(0.98)
  assert float(moco_v3.momentum_at(100, 100, 0.96)) == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.parametrize("config_module", [pretrain_simmim, pretrain_moco_v3])
def test_runlocal_trains_resumes_and_exports(tmp_path, config_module, capsys, monkeypatch):
  config = config_module.get_config("runlocal")
  ramps = []
  stream = synthetic.training_stream
  monkeypatch.setattr(synthetic, "training_stream",
                      lambda *a, **k: ramps.append(k["ramp"]) or stream(*a, **k))
  if config.objective == "moco_v3":  # the pair path: view 1 rendered apart (restyled)
    config.augment.second_view = "restyle"
    config.augment.second_view_ramp = (2, 4)
    config.data.version = 2
  metrics = pretrain.run(config, str(tmp_path))
  # The last line: steps, time, final loss and the export, under the runlocal's own name.
  out = capsys.readouterr().out.strip().splitlines()[-1]
  assert out.startswith(f"Finished 6 steps of {config.objective} pretraining in ")
  assert f"final loss {metrics['loss']:.4f}." in out
  assert out.endswith(f"Exported encoder '{config.name}' to {tmp_path / 'export'}")
  assert ramps == [(2, 4) if config.objective == "moco_v3" else (0, 0)]
  assert np.isfinite(metrics["loss"])
  records = trainer.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [2, 4, 6]
  # The same records as TensorBoard scalars (config.tensorboard, on by default).
  logged = tensorboard.read_scalars(str(tmp_path))
  assert logged["loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records]
  assert {"lr", "grad_norm", "images_per_s", "elapsed_s"} <= set(logged)
  model = registry.resolve(str(tmp_path / "export"))
  assert model.family == config.family and model.vit.depth == 2
  # Moving the frozen patch embedding would defeat MoCo v3's trick; it must stay at its init.
  if config.objective == "moco_v3":
    init, _, _ = trainer.initial_state(config, objectives.load(config))
    np.testing.assert_array_equal(model.params["patch_embed"]["kernel"],
                                  init["params"]["online"]["encoder"]["patch_embed"]["kernel"])
  else:
    assert model.params["block_0"]["gamma_1"].shape == (128,)
    # The export keeps the pixel head: `?decoder=1` gives the decoder analysis its decoder.
    head = registry.resolve(f"{tmp_path / 'export'}?decoder=1").decoder
    assert head["kind"] == "simmim" and head["config"] == {"patch_size": 4}
    curves = snapshots.run(config, str(tmp_path))  # metrics over the kept checkpoints
    assert curves["steps"] == [3, 6] and np.shape(curves["nmi"]) == (2, 2)
    assert curves["compilations"] == 1  # one compiled step for every checkpoint
    assert np.shape(curves["fourier"]) == (2, 3)  # embedding + 2 blocks
    assert (tmp_path / "snapshots.png").exists()
  # Resume: two more steps continue from the last checkpoint instead of starting over.
  config.unlock()
  config.total_steps = 8
  pretrain.run(config, str(tmp_path))
  assert "Resumed from step 6" in capsys.readouterr().out
  assert [r["step"] for r in trainer.read_metrics(str(tmp_path))][-1] == 8
  assert tensorboard.read_scalars(str(tmp_path))["loss"][-1][0] == 8  # a second event file
  # The training run's export says which allocator its training time was measured under.
  from clmim import host_memory
  trained = json.loads((tmp_path / "export" / "manifest.json").read_text())
  assert trained["host_memory"] == host_memory.status() and trained["training_time_s"] > 0
  out = export_job.export_checkpoint(config, str(tmp_path))
  assert registry.resolve(out).info["steps"] == 8
  if config.objective == "simmim":  # an export of a checkpoint keeps the decoder too
    assert registry.resolve(f"{out}?decoder=1").decoder["kind"] == "simmim"
  # The export records the data it was trained on (generator version included).
  manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
  assert manifest["config"]["data"]["version"] == config.data.version


def test_tensorboard_without_tensorboardx_is_one_line(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if not installed
  config = pretrain_simmim.get_config("runlocal")
  with pytest.raises(ClmimError, match=r"config.tensorboard=True needs tensorboardX \(pip"):
    preflight.check_fields(config, "pretrain", jax.device_count())
  config.unlock()
  config.tensorboard = False
  preflight.check_fields(config, "pretrain", jax.device_count())


def test_unknown_objective_is_a_clear_error():
  config = pretrain_simmim.get_config("runlocal")
  config.objective = "simmin"
  with pytest.raises(ClmimError, match="config.objective='simmin' .did you mean 'simmim'"):
    objectives.load(config)


@pytest.mark.slow
def test_init_encoder_starts_a_fresh_run_from_an_export(tmp_path):
  # Every run here logs every step (config.log_every is no part of the compiled step: all of
  # them run runlocal's one step program, from the session's compilation cache).
  first = pretrain_simmim.get_config("runlocal")
  first.log_every = 1
  pretrain.run(first, str(tmp_path / "first"))
  exported = registry.resolve(str(tmp_path / "first" / "export"))
  config = pretrain_simmim.get_config("runlocal")
  config.init_encoder = str(tmp_path / "first" / "export")
  objective = objectives.load(config)
  encoder = trainer.initial_encoder(config, objective)
  kernel = lambda tree: np.asarray(tree["block_1"]["mlp"]["fc1"]["kernel"])
  np.testing.assert_array_equal(kernel(encoder), kernel(exported.params))
  # A fresh run from the export trains on from its weights: its first loss is below a new
  # run's. (The first step's loss is computed on the initial weights, with the same images and
  # masks in both runs; "first" is such a new run.)
  config.log_every = 1
  pretrain.run(config, str(tmp_path / "again"))
  first_loss = lambda run: trainer.read_metrics(str(tmp_path / run))[0]
  assert first_loss("again")["step"] == first_loss("first")["step"] == 1
  assert first_loss("again")["loss"] < first_loss("first")["loss"]
  # Another architecture is refused before any step, naming the field and a parameter.
  deeper = pretrain_simmim.get_config("runlocal")
  deeper.model.depth = 3
  deeper.init_encoder = str(tmp_path / "first" / "export")
  with pytest.raises(ClmimError, match=r"config.init_encoder=.*block_2"):
    pretrain.run(deeper, str(tmp_path / "deeper"))
  assert not (tmp_path / "deeper" / "checkpoints").exists()


def test_moco_with_encoder_sets_the_online_and_the_momentum_encoder():
  config = pretrain_moco_v3.get_config("runlocal")
  objective = objectives.load(config)
  state, _, _ = trainer.initial_state(config, objective)
  other = jax.tree.map(lambda x: x + 1.0, state["params"]["online"]["encoder"])
  params, extra = objective.with_encoder(state["params"], state["state"], other)
  for tree in (params["online"]["encoder"], extra["momentum"]["encoder"]):
    jax.tree.map(np.testing.assert_array_equal, tree, other)
  jax.tree.map(np.testing.assert_array_equal, params["predictor"], state["params"]["predictor"])


_OLD_NO_DECAY = ("bias", "scale", "cls_token", "mask_token", "pos_embed", "table", "gamma_1",
                 "gamma_2", "q_bias", "v_bias")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pretrain_moco_v3", "pretrain_simmim"])  # frozen / BEiT names
def test_weight_decay_and_freezing_follow_the_path_patterns(name):
  import importlib
  config = importlib.import_module(f"configs.{name}").get_config("runlocal")
  objective = objectives.load(config)
  # Jitted, as trainer.initial_state does (op by op, the initialisers and the optimizer's
  # update cost seconds of per-op compilation); the same init program, so the session's
  # compilation cache serves it.
  params, _ = jax.jit(objective.init)(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))
  flat = {trainer._path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}

  def step(cfg):
    """Each parameter's update after one step from 0 with gradient 0: weight decay only."""
    tx, _ = trainer.make_optimizer(cfg, params, objective)

    @jax.jit
    def two_steps(params):
      ones = jax.tree.map(jnp.ones_like, params)
      zero_grads = jax.tree.map(jnp.zeros_like, params)
      state = tx.init(ones)
      for _ in range(2):  # warm-up: step 0 has lr 0
        updates, state = tx.update(zero_grads, state, ones)
      return jax.tree.map(lambda u: jnp.abs(u).max(), updates)
    return {trainer._path_str(p): float(u)
            for p, u in jax.tree_util.tree_flatten_with_path(two_steps(params))[0]}

  decayed = step(config)
  for path, x in flat.items():  # the default pattern is the former name list, exactly
    expected = x.ndim > 1 and path.split("/")[-1] not in _OLD_NO_DECAY \
        and not objective.frozen(path)
    assert (decayed[path] > 0) == expected, path
  config.unlock()
  config.no_weight_decay = ""  # only vectors are spared now
  config.freeze = r"block_0/"
  custom = step(config)
  for path, x in flat.items():
    if "block_0/" in path or objective.frozen(path):
      assert custom[path] == 0, path
    else:
      assert (custom[path] > 0) == (x.ndim > 1), path


def test_bad_path_patterns_are_one_line():
  from clmim import preflight
  config = pretrain_simmim.get_config("runlocal")
  config.unlock()
  config.freeze = "block_(0"
  with pytest.raises(ClmimError, match=r"config\.freeze='block_\(0' is not a regular expression"):
    preflight.check_fields(config, "pretrain", 1)


@pytest.mark.slow
def test_a_diverged_run_stops_naming_the_first_bad_step_and_saves_nothing_after(tmp_path,
                                                                               monkeypatch):
  """The loss turns NaN from step 4 on (1-based); log every 2, checkpoint every 3: the run stops
  at step 4 with one line naming step 4, keeps only the step-3 checkpoint and exports nothing.
  (NaN images from step 4 on make the loss NaN: runlocal's own compiled step, from the
  session's compilation cache, diverges.)"""
  config = pretrain_simmim.get_config("runlocal")
  stream = synthetic.training_stream

  def poisoned(dataset, batch_size, start_step, **kwargs):
    for step, batch in enumerate(stream(dataset, batch_size, start_step, **kwargs), start_step):
      yield {**batch, "image": np.full_like(batch["image"], np.nan)} if step >= 3 else batch

  monkeypatch.setattr(synthetic, "training_stream", poisoned)
  with pytest.raises(ClmimError, match=r"not finite at step 4;.*latest checkpoint: 3\)") as error:
    pretrain.run(config, str(tmp_path))
  assert "\n" not in str(error.value)
  assert preflight.checkpoint_steps(str(tmp_path)) == [3]
  assert not (tmp_path / "export").exists()
  assert [r["step"] for r in trainer.read_metrics(str(tmp_path))] == [2]


@pytest.mark.parametrize("name", ["pretrain_moco_v3", "pretrain_simmim", "pretrain_mae",
                                  "pretrain_hybrid", "finetune"])
def test_runlocal_models_never_take_a_shipped_name(name):
  """A 6-step depth-2 model named like a shipped one would pass for it in tables and titles."""
  config = importlib.import_module(f"configs.{name}").get_config("runlocal")
  assert config.name.endswith("_runlocal") and config.name not in registry.known_names()


def test_an_export_of_other_weights_never_takes_a_shipped_name(tmp_path):
  """A run of the demo recipe is named `<name>_retrained`, so it can be analysed beside the
  shipped model; the shipped weights themselves keep the name."""
  manifest, params = native.load(os.path.join(registry.DEMO_DIR, "simmim_demo"))
  config = pretrain_simmim.get_config("demo")
  assert config.name == "simmim_demo"
  native.save(str(tmp_path / "same"), config, params, manifest["model"], steps=10000)
  retrained = jax.tree.map(lambda x: x + np.float32(1e-3), params)
  native.save(str(tmp_path / "retrained"), config, retrained, manifest["model"], steps=10000)
  names = [registry.resolve(spec).name for spec in
           ("simmim_demo", str(tmp_path / "same"), str(tmp_path / "retrained"))]
  assert names == ["simmim_demo", "simmim_demo", "simmim_demo_retrained"]


def test_the_final_line_says_steps_time_loss_held_out_accuracy_and_the_export():
  records = [{"step": 250, "loss": 1.2, "elapsed_s": 80.0, "eval_top1": 0.6, "eval_loss": 1.0},
             {"step": 300, "loss": 1.0345, "elapsed_s": 95.04}]
  assert pretrain.summary_line(records, "finetune", "runs/ft/export", "finetune_demo", 200) == (
      "Finished 300 steps of fine-tuning in 95.0 s, final loss 1.0345, held-out top-1 0.600 "
      "(loss 1.0000, 200 images, at step 250). Exported encoder 'finetune_demo' to "
      "runs/ft/export")
  records[-1].update(eval_top1=0.71, eval_loss=0.8123)  # validated at the last step
  assert "held-out top-1 0.710 (loss 0.8123, 200 images)." in \
      pretrain.summary_line(records, "finetune", "out", "x", 200)
  assert pretrain.summary_line(records[:1], "mae", "runs/mae/export", "mae_demo_runlocal") == (
      "Finished 250 steps of mae pretraining in 80.0 s, final loss 1.2000, held-out top-1 "
      "0.600 (loss 1.0000). Exported encoder 'mae_demo_runlocal' to runs/mae/export")


def test_snapshots_read_the_runs_own_held_out_generator():
  # The held-out images come from the generator the run trained on (its data.version and seed),
  # built by the one evaluation-data builder (config_lib.held_out_data).
  config = pretrain_simmim.get_config("runlocal")
  config.data.version, config.data.seed = 2, 5
  images = snapshots.held_out_images(config)
  assert (images.dataset.version, images.dataset.split) == (2, "validation")
  assert "seed 5" in images.description and len(images) == config.snapshot_images
