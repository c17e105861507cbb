"""Mixed precision (`dtype`, `config.dtype`) and the persistent compilation cache."""
import collections
import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clmim import preflight
from clmim.errors import ClmimError
from clmim.jobs import analyze
from clmim.models.vit import build_vit, forward_with_states, vit_fields
from configs import nmi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEIT = dict(block_style="beit", position_embedding="none", rel_pos_bias="shared",
            layer_scale_init=0.1)


def _primitive_dtypes(fn, *args) -> collections.Counter:
  """(primitive, output dtype) counts of the matmuls and convolutions `fn` runs."""
  counts = collections.Counter()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
        counts[(eqn.primitive.name, str(eqn.outvars[0].aval.dtype))] += 1
      for value in eqn.params.values():
        inner = getattr(value, "jaxpr", None)
        if inner is not None:
          walk(getattr(inner, "jaxpr", inner))
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return counts


@pytest.mark.parametrize("extra", [{}, BEIT], ids=["timm", "beit"])
def test_bfloat16_runs_every_matmul_in_bfloat16_and_hands_analyses_float32(extra):
  model = build_vit("mu/4", image_size=32, depth=2, **extra)  # two blocks: every kind of layer
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  # Jit-compiled, as the analyses and the trainers run them (op by op is slower: every op
  # compiles on its own).
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images)["params"]
  half = model.clone(dtype="bfloat16")
  assert vit_fields(half) == vit_fields(model)  # how it computes, not what it is
  counts = _primitive_dtypes(lambda p, x: half.apply({"params": p}, x), params, images)
  assert counts and all(dtype == "bfloat16" for _, dtype in counts)
  assert all(dtype == "float32" for _, dtype in
             _primitive_dtypes(lambda p, x: model.apply({"params": p}, x), params, images))
  zs, attns = jax.jit(functools.partial(forward_with_states, half))(params, images)
  zs32, attns32 = jax.jit(functools.partial(forward_with_states, model))(params, images)
  assert all(z.dtype == jnp.float32 for z in zs) and all(a.dtype == jnp.float32 for a in attns)
  # Attention rows are float32 softmax outputs: they sum to 1 to float32 round-off.
  np.testing.assert_allclose(np.asarray(attns[-1]).sum(-1), 1.0, atol=1e-5)
  for low, high in zip(attns, attns32):  # close to float32, but not float32
    difference = float(jnp.abs(low - high).max())
    assert 0 < difference < 0.05
  relative = jnp.abs(zs[-1] - zs32[-1]).max() / jnp.abs(zs32[-1]).max()
  assert 0 < float(relative) < 0.05
  with pytest.raises(ClmimError, match="dtype='float16'"):
    build_vit("mu/4", image_size=32, dtype="float16")


@pytest.mark.slow
def test_config_dtype_runs_the_analyses_in_bfloat16_close_to_float32(tmp_path):
  results = {}
  for dtype in ("float32", "bfloat16"):
    config = nmi.get_config("runlocal")
    with config.unlocked():
      config.dtype, config.progress, config.data.num_images = dtype, False, 16
      config.models = "moco_v3_demo"  # one architecture: one compilation per dtype
      config.analyses = "attention_distance,nmi,fourier"
      config.batch_size = 8
    results[dtype] = analyze.run(config, str(tmp_path / dtype))
    assert results[dtype]["config"]["dtype"] == dtype  # recorded with the run
  for metric in ("attention_distance", "nmi", "fourier"):
    full = np.asarray(results["float32"]["models"]["moco_v3_demo"][metric])
    half = np.asarray(results["bfloat16"]["models"]["moco_v3_demo"][metric])
    assert not np.array_equal(full, half), metric
    np.testing.assert_allclose(half, full, rtol=0.1, atol=0.02, err_msg=metric)
  config = nmi.get_config("runlocal")
  with config.unlocked():
    config.dtype = "half"
  with pytest.raises(ClmimError, match=r"config.dtype='half': expected one of \('float32', "
                                       r"'bfloat16'\)"):
    preflight.check_run(config, str(tmp_path / "bad"), jax.device_count())
  assert not (tmp_path / "bad").exists()


_RUN_TWICE = textwrap.dedent("""
    import json, sys
    import jax
    from clmim import main
    from configs import nmi
    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
    config = nmi.get_config("runlocal")
    with config.unlocked():
      config.compilation_cache, config.progress = sys.argv[1], False
      config.data.num_images, config.batch_size, config.include_untrained = 8, 8, False
      config.models = "moco_v3_demo"
    main.run(config, sys.argv[2])
    print(json.dumps({"hits": len(hits)}))
""")


@pytest.mark.slow
def test_the_compilation_cache_serves_a_second_run(tmp_path):
  cache = tmp_path / "cache"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  hits = []
  for run in ("first", "second"):
    done = subprocess.run([sys.executable, "-c", _RUN_TWICE, str(cache), str(tmp_path / run)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    hits.append(json.loads(done.stdout.strip().splitlines()[-1])["hits"])
  assert any(name.startswith("jit_local_step") for name in os.listdir(cache))
  assert hits[0] == 0 and hits[1] >= 1  # the analysis step was loaded, not compiled again
  blocked = tmp_path / "a_file"
  blocked.write_text("")
  from clmim import main
  with pytest.raises(ClmimError, match="config.compilation_cache=.*cannot create the folder"):
    main.enable_compilation_cache(str(blocked / "cache"))


def test_clmim_compilation_cache_replaces_the_default_folder(tmp_path):
  """$CLMIM_COMPILATION_CACHE is every config's default cache folder (the tests point their
  commands at a session folder with it); without it the default is ~/.cache/clmim/jax."""
  # One fresh interpreter for both cases (an interpreter costs ~2 s): imported with the variable
  # set, then config_lib imported again (reload) with it unset.
  script = textwrap.dedent("""
      import importlib, os
      from clmim import config_lib
      from configs import nmi, pretrain_simmim
      def defaults():
        print(nmi.get_config().compilation_cache,
              pretrain_simmim.get_config("runlocal").compilation_cache)
      defaults()
      del os.environ["CLMIM_COMPILATION_CACHE"]
      importlib.reload(config_lib)
      defaults()
  """)
  environment = {k: v for k, v in os.environ.items() if k != "CLMIM_COMPILATION_CACHE"}
  done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                        text=True, check=True,
                        env={**environment, "CLMIM_COMPILATION_CACHE": str(tmp_path)})
  with_variable, without = (line.split() for line in done.stdout.splitlines())
  assert with_variable == [str(tmp_path)] * 2
  assert without == ["~/.cache/clmim/jax"] * 2
