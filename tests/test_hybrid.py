"""The CL + MIM hybrid objective: λ weighting, both branches reach the backbone, bad λ, a run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clmim.checkpoints import registry
from clmim.errors import ClmimError
from clmim.train import hybrid, trainer
from clmim.jobs import pretrain
from configs import pretrain_hybrid


def _objective(weight):
  config = pretrain_hybrid.get_config("runlocal")
  config.unlock()
  config.hybrid.weight = weight
  return config, hybrid.Objective(config)


def _setup(weight):
  config, objective = _objective(weight)
  images = jax.random.uniform(jax.random.PRNGKey(3), (4, 32, 32, 3))
  params, state = jax.jit(objective.init)(jax.random.PRNGKey(0), images)
  return config, objective, params, state, images


@pytest.mark.slow
def test_loss_and_gradient_are_the_weighted_sums_of_the_two_branches():
  """At λ = 0.25 the loss is exactly 0.75 · L_MIM + 0.25 · L_CL (both logged), each branch's
  gradient reaches the shared backbone and only its own heads, and the loss's gradient is their
  weighted sum. (λ = 0 and 1, where one branch is skipped: test_sweep.py.) One compiled
  function gives the three losses and, by reverse mode, their three gradients."""
  _, objective, params, state, images = _setup(0.25)

  def losses(p):
    total, (_, metrics) = objective.loss(p, state, images, jax.random.PRNGKey(1), 0)
    return jnp.stack([total, metrics["loss_mim"], metrics["loss_cl"]])

  values, grads = jax.jit(lambda p: (losses(p), jax.jacrev(losses)(p)))(params)
  total, mim, cl = (float(v) for v in values)
  np.testing.assert_allclose(total, 0.75 * mim + 0.25 * cl, rtol=1e-6)
  both, only_mim, only_cl = (jax.tree.map(lambda g, i=i: g[i], grads) for i in range(3))

  def norm(tree):
    return float(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree))) ** 0.5

  for g in (only_mim, only_cl, both):
    assert norm(g["online"]["encoder"]["block_0"]) > 0
  assert norm(only_mim["predictor"]) == 0 and norm(only_mim["online"]["projector"]) == 0
  assert norm(only_cl["head"]) == 0
  assert norm(both["head"]) > 0 and norm(both["predictor"]) > 0
  mixed = jax.tree.map(lambda a, b: 0.75 * a + 0.25 * b, only_mim["online"]["encoder"],
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


@pytest.mark.slow
def test_runlocal_logs_both_losses_and_exports(tmp_path):
  config = pretrain_hybrid.get_config("runlocal")
  metrics = pretrain.run(config, str(tmp_path))
  assert np.isfinite(metrics["loss"])
  records = trainer.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [2, 4, 6]
  for r in records:
    assert r["loss"] == pytest.approx(0.5 * r["loss_mim"] + 0.5 * r["loss_cl"], rel=1e-5)
  model = registry.resolve(str(tmp_path / "export"))
  assert model.info["method"] == "hybrid" and model.vit.use_mask_token
  assert model.name == "hybrid_demo_runlocal"
  # The MIM branch's pixel head is kept: `?decoder=1` loads it as a SimMIM decoder.
  assert registry.resolve(f"{tmp_path / 'export'}?decoder=1").decoder["kind"] == "simmim"


def test_the_export_keeps_the_pixel_head_unless_the_mim_branch_never_ran():
  head = {"linear": {"kernel": np.ones((128, 48)), "bias": np.zeros(48)}}
  assert _objective(0.5)[1].pretraining_decoder({"head": head}) == {
      "kind": "simmim", "params": head, "config": {"patch_size": 4}}
  assert _objective(1.0)[1].pretraining_decoder({"head": head}) is None  # an untrained head
