"""clmim imports and runs with only its core stack (jax, flax, optax, orbax, matplotlib, tqdm,
numpy); the optional data stacks (TFDS, Pillow), scikit-learn (t-SNE) and the config stack
(ml_collections, absl) load lazily, with a one-line ClmimError naming what is missing.

The run happens in a fresh interpreter whose imports of those packages fail, as on a machine
without them. absl and Pillow cannot be removed outright: flax, optax and orbax import absl, and
matplotlib imports Pillow, so those two are refused only to clmim's own code (where clmim
importing them is the mistake this test guards against); the others are refused to everyone.
"""
import ast
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Not installed on the users' GPU machines: an import from anywhere fails.
ABSENT = ("tensorflow_datasets", "tensorflow", "sklearn", "ml_collections", "grain", "torch")
# Installed only as dependencies of the core stack: clmim itself must not import them.
NOT_FOR_CLMIM = ("absl", "PIL")
OPTIONAL = ABSENT + NOT_FOR_CLMIM

# The library path: what must import (and run) without the optional packages.
LIBRARY_PACKAGES = ("clmim.models", "clmim.analysis", "clmim.checkpoints")
LIBRARY_MODULES = ("clmim.data.synthetic", "clmim.data.eval_data", "clmim.data.loader",
                   "clmim.data.preprocess", "clmim.data.image_folder", "clmim.data.labelled",
                   "clmim.jobs.analyze", "clmim.preflight")

# Installed first in the child: a meta-path finder for ABSENT and an `__import__` wrapper that
# refuses NOT_FOR_CLMIM to modules named clmim.*. The wrapper sees every import statement,
# including those of modules already loaded (matplotlib loads PIL before clmim asks for it).
BLOCKER = textwrap.dedent(f"""
    import builtins, importlib, importlib.abc, sys

    ABSENT, NOT_FOR_CLMIM = {ABSENT!r}, {NOT_FOR_CLMIM!r}
    assert not [m for m in ABSENT if m in sys.modules], "imported before the blocker"

    class Absent(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
          raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None

    sys.meta_path.insert(0, Absent())

    def refused(name, importer):
      return (name.partition(".")[0] in NOT_FOR_CLMIM
              and str(importer).partition(".")[0] == "clmim")

    real_import, real_import_module = builtins.__import__, importlib.import_module

    def blocked_import(name, globals=None, locals=None, fromlist=(), level=0):
      if level == 0 and refused(name, (globals or {{}}).get("__name__")):
        raise ModuleNotFoundError(f"No module named {{name!r}} (blocked for clmim)", name=name)
      return real_import(name, globals, locals, fromlist, level)

    def blocked_import_module(name, package=None):
      if refused(name, sys._getframe(1).f_globals.get("__name__")):
        raise ModuleNotFoundError(f"No module named {{name!r}} (blocked for clmim)", name=name)
      return real_import_module(name, package)

    builtins.__import__, importlib.import_module = blocked_import, blocked_import_module
""")

# What the child runs after the blocker: import the library, run analyses end to end on a tiny
# random ViT and on the shipped demo model, and collect the optional packages' error messages.
SCRIPT = textwrap.dedent(f"""
    import functools, importlib, json, os, pkgutil, sys
    import numpy as np
    import jax

    for package in {LIBRARY_PACKAGES!r}:
      path = importlib.import_module(package).__path__
      for info in pkgutil.iter_modules(path):
        importlib.import_module(f"{{package}}.{{info.name}}")
    for module in {LIBRARY_MODULES!r}:
      importlib.import_module(module)

    from clmim.analysis import attention_distance, core, fourier, nmi, tsne
    from clmim.analysis.runner import Analyzer
    from clmim.checkpoints import registry
    from clmim.data.eval_data import EvalImages
    from clmim.data.synthetic import ShapesTextures
    from clmim.errors import ClmimError
    from clmim.models import vit as vit_lib

    class Config(dict):
      # A config without ml_collections: attribute access and .get are all clmim reads.
      __getattr__ = dict.__getitem__

    def finite(results, modules):
      for module in modules:
        for result in module.RESULTS:
          values = np.asarray(results[result.key], np.float64)
          assert values.size and np.isfinite(values).all(), (result.key, values)

    modules = [attention_distance, nmi, fourier]
    # sincos position embedding: the demo model's architecture, so that its run below reuses
    # this compiled step (compiling twice would double the test's time).
    model = vit_lib.build_vit("mu/4", image_size=32, position_embedding="sincos")
    images = ShapesTextures(32, "validation", 16).batch(range(16))["image"]
    params = model.init(jax.random.PRNGKey(0), images[:1])["params"]
    analyzer = Analyzer(functools.partial(vit_lib.forward_with_states, model), modules,
                        patch_size=4, device_batch_size=4)
    results = analyzer.run(params, [images], progress=False)
    assert results["num_images"] == 16, results["num_images"]
    finite(results, modules)

    # The shipped demo model, through the registry and the evaluation data path (normalised
    # as its manifest says); same architecture, so the analyses run without compiling again.
    demo = registry.resolve("moco_v3_demo")
    assert vit_lib.vit_fields(demo.vit) == vit_lib.vit_fields(model), vit_lib.vit_fields(demo.vit)
    data = Config(source="synthetic", split="validation", num_images=16, seed=0, version=1)
    stream = EvalImages(data, demo.preprocessing)
    demo_results = analyzer.run(demo.params, stream.batches(8), progress=False)
    assert demo_results["num_images"] == 16 and analyzer.compilations == 1
    finite(demo_results, modules)

    def message(call):
      try:
        call()
      except ClmimError as e:
        return str(e)
      raise AssertionError("no ClmimError")

    folder = Config(data, source="image_folder", path=sys.argv[1], crop_pct=0.0,
                    interpolation="")
    tfds = Config(data, source="tfds", split="validation", tfds_name="imagenette", crop_pct=0.0,
                  interpolation="")
    print(json.dumps({{
        "image_folder": message(lambda: EvalImages(folder, demo.preprocessing)),
        "tfds": message(lambda: EvalImages(tfds, demo.preprocessing)),
        "tsne": message(lambda: tsne.check(demo, tsne.OPTIONS)),
        "loaded": sorted(m for m in {OPTIONAL!r} if m in sys.modules),
    }}))
""")


def _pins() -> dict:
  """{package name: 'name==version'} from requirements.txt."""
  pins = {}
  for line in (ROOT / "requirements.txt").read_text().splitlines():
    match = re.match(r"\s*([A-Za-z0-9_.-]+)==([^\s#]+)", line)
    if match:
      pins[match.group(1).lower()] = f"{match.group(1)}=={match.group(2)}"
  return pins


def _module_level_imports(tree: ast.Module) -> list:
  """Top-level names imported when the module is (not in functions; not under TYPE_CHECKING)."""
  found = []

  def visit(statements):
    for node in statements:
      if isinstance(node, ast.Import):
        found.extend((a.name, node.lineno) for a in node.names)
      elif isinstance(node, ast.ImportFrom) and not node.level:
        found.append((node.module, node.lineno))
      elif isinstance(node, ast.If):
        if "TYPE_CHECKING" not in ast.unparse(node.test):
          visit(node.body)
        visit(node.orelse)
      elif isinstance(node, ast.Try):
        for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
          visit(block)
      elif isinstance(node, (ast.With, ast.For, ast.While)):
        visit(node.body)

  visit(tree.body)
  return found


def test_library_has_no_module_level_optional_imports():
  """A static check with the exact line: the library path imports no optional package eagerly."""
  files = [ROOT / "clmim" / package.split(".")[1] for package in LIBRARY_PACKAGES]
  files = [f for folder in files for f in sorted(folder.glob("*.py"))]
  files += [ROOT / (m.replace(".", "/") + ".py") for m in LIBRARY_MODULES]
  files += [ROOT / "clmim" / "data" / "tfds_source.py"]  # imported lazily, itself lazy inside
  eager = []
  for path in files:
    for name, line in _module_level_imports(ast.parse(path.read_text())):
      if name.partition(".")[0] in OPTIONAL:
        eager.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
  assert not eager, "\n".join(eager)


@pytest.mark.slow
def test_imports_and_runs_without_optional_packages(tmp_path):
  """Imports every library module and runs three analyses on a random ViT and the shipped demo
  model with the optional packages blocked; their absence is one clear ClmimError each."""
  folder = tmp_path / "images" / "cat"
  folder.mkdir(parents=True)
  (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # never decoded: Pillow is checked first
  # LLVM at -O0 as in conftest: the child's time is mostly compiling the analysis step.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"
                      " --xla_backend_optimization_level=0",
         "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
  run = subprocess.run([sys.executable, "-c", BLOCKER + SCRIPT, str(tmp_path / "images")],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
  assert run.returncode == 0, run.stderr[-4000:]
  out = json.loads(run.stdout.strip().splitlines()[-1])
  # Only what the core stack brings along (matplotlib: Pillow; flax, optax, orbax: absl).
  assert set(out["loaded"]) <= set(NOT_FOR_CLMIM), out["loaded"]

  pins = _pins()
  for key, package, needed_for in (
      ("image_folder", "pillow", "reading image folders needs Pillow"),
      ("tfds", "tensorflow-datasets", "config.data.source='tfds' needs tensorflow-datasets"),
      ("tsne", "scikit-learn", "t-SNE analysis needs scikit-learn")):
    text = out[key]
    assert "\n" not in text, text
    assert needed_for in text, text
    assert f"pip install {pins[package]}" in text, (text, pins[package])


def test_missing_pillow_in_process(tmp_path, monkeypatch):
  """The same image-folder error in this process (Pillow hidden), and the folder still reads
  once Pillow is back: nothing was cached from the failed attempt."""
  from PIL import Image

  from clmim.data import preprocess as pp
  from clmim.data.image_folder import ImageFolder
  from clmim.errors import ClmimError

  (tmp_path / "cat").mkdir()
  Image.new("RGB", (20, 12), (200, 10, 10)).save(tmp_path / "cat" / "a.png")
  monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` now fails
  with pytest.raises(ClmimError, match=r"^reading image folders needs Pillow .*: pip install "
                                       r"pillow==") as error:
    ImageFolder(str(tmp_path), pp.EvalPreprocess(8))
  assert "\n" not in str(error.value)
  monkeypatch.undo()
  image, label = ImageFolder(str(tmp_path), pp.EvalPreprocess(8, crop_pct=1.0, mean="half",
                                                               std="half"))[0]
  assert label == 0 and image.shape == (8, 8, 3)
  assert abs(float(image[..., 0].mean()) - (200 / 255 - 0.5) / 0.5) < 0.02
