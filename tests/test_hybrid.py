"""The CL + MIM hybrid objective: λ weighting, both branches reach the backbone, bad λ, a run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clmim.checkpoints import registry
from clmim.errors import ClmimError
from clmim.train import hybrid, simmim, trainer
from configs import pretrain_hybrid


def _objective(weight):
  config = pretrain_hybrid.get_config("runlocal")
  config.unlock()
  config.hybrid.weight = weight
  return config, hybrid.Objective(config)


def _setup(weight):
  config, objective = _objective(weight)
  images = jax.random.uniform(jax.random.PRNGKey(3), (4, 32, 32, 3))
  params, state = objective.init(jax.random.PRNGKey(0), images)
  return config, objective, params, state, images


@pytest.mark.parametrize("weight", [0.25])  # λ = 0 and 1 (one branch skipped): test_sweep.py
def test_loss_is_the_weighted_sum_of_the_two_branches(weight):
  config, objective, params, state, images = _setup(weight)
  rng = jax.random.PRNGKey(7)
  loss, (_, metrics) = objective.loss(params, state, images, rng, 0)
  k_cl, k_mim = jax.random.split(rng)
  mim, _ = simmim.reconstruction_loss(objective.encoder, objective.head,
                                      params["online"]["encoder"], params["head"], images,
                                      k_mim, config)
  cl, _ = objective.moco.loss({"online": params["online"], "predictor": params["predictor"]},
                              state, images, k_cl, 0)
  np.testing.assert_allclose(loss, (1 - weight) * mim + weight * cl, rtol=1e-6)
  assert ("loss_mim" in metrics) == (weight < 1) and ("loss_cl" in metrics) == (weight > 0)
  if 0 < weight < 1:
    np.testing.assert_allclose(metrics["loss_mim"], mim, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss_cl"], cl, rtol=1e-6)


def test_both_branches_reach_the_shared_backbone():
  def grads(weight):
    _, objective, params, state, images = _setup(weight)
    return jax.grad(lambda p: objective.loss(p, state, images, jax.random.PRNGKey(1), 0)[0])(
        params)

  def norm(tree):
    return float(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree))) ** 0.5

  only_mim, only_cl, both = grads(0.0), grads(1.0), grads(0.5)
  for g in (only_mim, only_cl, both):
    assert norm(g["online"]["encoder"]["block_0"]) > 0
  assert norm(only_mim["predictor"]) == 0 and norm(only_mim["online"]["projector"]) == 0
  assert norm(only_cl["head"]) == 0
  assert norm(both["head"]) > 0 and norm(both["predictor"]) > 0
  # The backbone's gradient at λ = 0.5 is the mean of the two single-branch gradients.
  mixed = jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, only_mim["online"]["encoder"],
                       only_cl["online"]["encoder"])
  for a, b in zip(jax.tree.leaves(mixed), jax.tree.leaves(both["online"]["encoder"])):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("weight", [-0.1, 1.5, float("nan")])
def test_weight_outside_zero_one_is_one_line(weight):
  with pytest.raises(ClmimError, match=r"config\.hybrid\.weight") as error:
    _objective(weight)
  assert "\n" not in str(error.value)


def test_needs_the_mask_token():
  config = pretrain_hybrid.get_config("runlocal")
  config.unlock()
  config.model.use_mask_token = False
  with pytest.raises(ClmimError, match="use_mask_token"):
    hybrid.Objective(config)


def test_runlocal_logs_both_losses_and_exports(tmp_path):
  config = pretrain_hybrid.get_config("runlocal")
  metrics = trainer.train(config, str(tmp_path))
  assert np.isfinite(metrics["loss"])
  records = trainer.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [2, 4, 6]
  for r in records:
    assert r["loss"] == pytest.approx(0.5 * r["loss_mim"] + 0.5 * r["loss_cl"], rel=1e-5)
  model = registry.resolve(str(tmp_path / "export"))
  assert model.info["method"] == "hybrid" and model.vit.use_mask_token
