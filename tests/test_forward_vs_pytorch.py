"""benchmarks/forward_vs_pytorch.py times what it claims: the same model and the same quantities.

The benchmark's main path runs on a tiny ViT (its forwards and pipelines must agree), and the
reimplementations of the official notebook analyses (benchmarks/torch_reference.py) must give
clmim's numbers on the very same attention maps and states; otherwise the timing would compare
different computations.
"""
import functools
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("einops")  # the official notebooks' helpers, used by the reimplementations

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from clmim.analysis import attention_distance, core, fourier, nmi  # noqa: E402
from clmim.models.vit import build_vit, forward_with_states  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "forward_vs_pytorch.py")


def _load_benchmark(name="forward_vs_pytorch"):
  """benchmarks/<name>.py, imported from its file (benchmarks/ is not a package)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks",
                                                                   name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _random_params(model, images, qkv_gain, seed=2):
  """Random weights in the model's parameter tree, drawn with numpy (compiling `model.init`
  would cost more than the rest of the test): kernels ~ N(0, 1/fan_in) (qkv times `qkv_gain`),
  LayerNorm scales near 1, other vectors and tables ~ N(0, 0.02^2)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images[:1])["params"]

  def draw(path, leaf):
    names = [getattr(key, "key", "") for key in path]
    if names[-1] == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      value = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
      value *= qkv_gain if "qkv" in names else 1.0
    elif names[-1] == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
    else:
      value = 0.02 * rng.standard_normal(leaf.shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture
def one_torch_thread():
  """Single-threaded torch for tiny tensors (and restored after: other tests share torch)."""
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


@pytest.mark.slow
def test_main_path_reports_agreeing_forwards_and_pipelines():
  # A subprocess, as users run it: it pins its cores and sets torch's threads for itself only.
  # Two blocks: what is checked (agreeing forwards and pipelines) holds for any depth, and the
  # compiles shrink with it.
  result = subprocess.run(
      [sys.executable, SCRIPT, "--variant", "mu/4", "--size", "32", "--depth", "2", "--batch",
       "4", "--repeats", "1", "--threads", "1"],
      capture_output=True, text=True, timeout=240, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["depth"] == 2
  for key in ("clmim_forward_s", "torch_forward_s", "forward_speedup",
              "clmim_pipeline_images_per_s", "official_pipeline_images_per_s",
              "pipeline_speedup", "max_abs_diff", "official_parts_s", "clmim_forward_gflops",
              "torch_forward_gflops", "xla_matmul_gflops", "torch_matmul_gflops", "device",
              "cpu_count", "machine", "jax", "torch", "threads"):
    assert key in report, key
  assert set(report["official_parts_s"]) == {"forward", "distance", "nmi", "fourier"}
  assert report["threads"] == report["torch_threads"] == 1
  assert report["max_abs_diff"] < 1e-4
  # The two pipelines, each end to end from its own forward, give the same numbers.
  diffs = report["analysis_max_abs_diff"]
  assert diffs["attention_distance"] < 1e-3  # pixels, values ~16
  assert diffs["nmi"] < 1e-5
  assert diffs["fourier_all_states"] < 1e-3
  for key in ("clmim_forward_s", "torch_forward_s", "clmim_pipeline_images_per_s",
              "official_pipeline_images_per_s", "xla_matmul_gflops", "torch_matmul_gflops"):
    assert report[key] > 0, key
  assert len(report["official_pipeline_times_s"]) == 1


def test_flop_count_is_the_usual_vit_b_figure():
  bench = _load_benchmark()
  assert bench.vit_forward_flops(768, 12, 3072, 16, 224) / 1e9 == pytest.approx(35.1, abs=0.05)


@pytest.mark.parametrize("size,qkv_gain", [(32, 1.0), (28, 4.0)])
def test_official_reimplementations_match_clmim_on_the_same_maps(one_torch_thread, size,
                                                                 qkv_gain):
  # qkv_gain 4 sharpens the random attention (logits x 16): peaked, unequal maps rather
  # than near-uniform ones. Size 28 at patch 4 is an odd (7 x 7) grid for the Fourier read-out,
  # 32 an even one (8 x 8).
  reference = _load_benchmark("torch_reference")
  model = build_vit("mu/4", image_size=size, depth=3)  # 3 blocks: 3 maps and 7 states suffice
  images = jnp.asarray(np.random.default_rng(1).standard_normal((3, size, size, 3), np.float32))
  params = _random_params(model, images, qkv_gain)
  zs, attns = jax.jit(functools.partial(forward_with_states, model))(params, images)

  official = reference.official_analyses([torch.from_numpy(np.array(z)) for z in zs],
                                         [torch.from_numpy(np.array(a)) for a in attns],
                                         model.patch_size)
  analyses = (attention_distance, nmi, fourier)

  @jax.jit  # all three in one computation, as in the runner's step (op by op is much slower)
  def partial_sums(zs, attns):
    weights = jnp.ones((images.shape[0],), jnp.float32)
    index = jnp.arange(images.shape[0], dtype=jnp.int32)
    batch = core.Batch(zs, attns, weights, index, model.patch_size)
    return [core.sums_of(analysis, batch, {}) for analysis in analyses]

  sums = partial_sums(zs, attns)
  ours = {}
  for analysis, sum_ in zip(analyses, sums):
    ours.update(analysis.finalize(jax.tree.map(lambda x: np.asarray(x, np.float64), sum_), {}))

  grid = size // model.patch_size
  assert official["attention_distance"].shape == (model.depth, model.num_heads)
  assert official["fourier_all_states"].shape == (2 * model.depth + 1, grid - grid // 2)
  np.testing.assert_allclose(official["attention_distance"], ours["attention_distance"],
                             rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(official["nmi"], ours["nmi"], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(official["fourier_all_states"], ours["fourier_all_states"],
                             atol=1e-4)
  if qkv_gain > 1:  # the sharpened maps really are far from uniform attention
    assert np.max(official["nmi"]) > 0.1


@pytest.mark.slow
def test_moco_step_benchmark_compares_the_same_network_and_loss():
  """benchmarks/moco_step_vs_pytorch.py: PyTorch loaded with clmim's initial weights gives the
  same loss and gradients on one un-augmented pair of views, and both libraries then train."""
  import contextlib
  import io
  sys.path.insert(0, ROOT)
  from benchmarks import moco_step_vs_pytorch
  with contextlib.redirect_stdout(io.StringIO()) as out:
    report = moco_step_vs_pytorch.main(["--batch", "8", "--steps", "1", "--repeats", "1",
                                        "--depth", "1", "--all_tokens"])
  assert json.loads(out.getvalue()) == report
  check = report["same_network_check"]
  for prefix in ("", "pytorch_cls_only_"):  # the official form, and the cls-only last block
    assert check[f"{prefix}loss_abs_diff"] < 1e-5, check
    assert max(check[f"{prefix}gradient_relative_diff"].values()) < 1e-4, check
  assert all(np.isfinite(v) for v in report["final_loss"].values())
  assert set(report["images_per_s"]) == {"clmim", "clmim_all_tokens", "pytorch",
                                          "pytorch_cls_only"}
  paired = report["paired_clmim_speedup"]
  assert set(paired) == {"clmim_all_tokens", "pytorch", "pytorch_cls_only"}
  assert paired["pytorch"]["faster_in"] in ("0/1", "1/1")
  # The two clmim forms train the same network from the same start: one step, equal losses.
  assert report["final_loss"]["clmim"] == pytest.approx(report["final_loss"]["clmim_all_tokens"],
                                                        rel=1e-5)


@pytest.mark.slow
def test_vit_matmuls_benchmark_times_the_same_products_and_splits_the_gap():
  """benchmarks/vit_matmuls_vs_pytorch.py: every product and the attention core agree between
  the libraries before they are timed, the two models compute the same loss and gradients, and
  the model's gap is split into parts that add up."""
  import contextlib
  import io
  sys.path.insert(0, ROOT)
  from benchmarks import vit_matmuls_vs_pytorch as bench
  with contextlib.redirect_stdout(io.StringIO()) as out:
    report = bench.main(["--size", "16", "--batch", "2", "--repeats", "1", "--inner", "1",
                         "--depth", "2"])
  assert json.loads(out.getvalue()) == report
  assert report["rows"] == 2 * 17 and report["depth"] == 2
  check = report["same_model_check"]
  assert check["loss_abs_diff"] < 1e-6 and check["qkv_kernel_grad_rel_diff"] < 1e-4, check
  assert set(report["matmuls"]) == {"qkv", "proj", "fc1", "fc2"}
  per_pass = report["dense_matmuls_per_forward_backward_ms"]
  assert set(per_pass) == set(bench.FORMS)
  for form, sums in per_pass.items():
    for name in ("xla", "torch"):
      want = report["depth"] * sum(report["matmuls"][layer][form][f"{name}_ms"]
                                   for layer in report["matmuls"])
      assert sums[f"{name}_ms"] == pytest.approx(want, abs=0.01)
  model_gap = 1e3 * (report["model_forward_backward_s"]["clmim"]
                     - report["model_forward_backward_s"]["pytorch"])
  assert report["model_gap_ms"] == pytest.approx(model_gap, abs=0.1)
  parts = report["dense_matmul_gap_ms"] + report["attention_core_gap_ms"] + report["rest_gap_ms"]
  assert parts == pytest.approx(report["model_gap_ms"], abs=0.2)


def test_paired_speedup_compares_repeat_by_repeat():
  """benchmarks/torch_reference.paired_speedup: known ratios, an interval around their median,
  and a drift that both contenders share cancels out."""
  sys.path.insert(0, ROOT)
  from benchmarks.torch_reference import paired_speedup
  drift = np.linspace(1.0, 2.0, 21)  # the VM slows down during the run, for both alike
  same = paired_speedup(list(drift), list(drift))
  assert same == {"median": 1.0, "ci95": [1.0, 1.0], "faster_in": "0/21"}
  ratios = np.linspace(1.05, 1.25, 21)
  faster = paired_speedup(list(drift), list(drift * ratios))
  assert faster["median"] == pytest.approx(1.15)
  assert faster["ci95"][0] < 1.15 < faster["ci95"][1] and faster["ci95"][0] > 1.05
  assert faster["faster_in"] == "21/21"
  with pytest.raises(ValueError, match="equal-length"):
    paired_speedup([1.0, 2.0], [1.0])
