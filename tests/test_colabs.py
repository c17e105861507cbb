"""The Colab notebooks are valid nbformat 4.5 and run as written, from `colabs/`, with clmim found
only through its (editable) pip install -- no PYTHONPATH, no reliance on the repository root."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(ROOT, "colabs")
NOTEBOOKS = sorted(f for f in os.listdir(COLABS) if f.endswith(".ipynb"))

# The test rewrites this line (to write into tmp_path); renaming it must fail the test loudly.
# Each notebook names its own folder, so two notebooks run in one Colab never share outputs.
WORKDIR_LINE = re.compile(r'^WORKDIR = os\.path\.abspath\("[\w.-]+"\)$', re.MULTILINE)

# Allowed keys per cell type (nbformat 4.5 schema; it forbids any other key).
CELL_KEYS = {"code": {"id", "cell_type", "metadata", "source", "execution_count", "outputs"},
             "markdown": {"id", "cell_type", "metadata", "source", "attachments"},
             "raw": {"id", "cell_type", "metadata", "source", "attachments"}}

# IPython is not a test dependency: its one import line is swapped for stand-ins that check and
# record every displayed figure. (A fake IPython module in sys.modules confuses matplotlib.)
DISPLAY_LINE = "from IPython.display import Image, display"
SHIM = """import atexit, os
_shown = []
def Image(filename):
  assert os.path.getsize(filename) > 0, filename
  _shown.append(os.path.abspath(filename))
  return filename
def display(*objects):
  pass
atexit.register(lambda: open({shown!r}, "w").write("\\n".join(_shown)))"""


def _load(name):
  with open(os.path.join(COLABS, name), encoding="utf-8") as f:
    return json.load(f)


def _source(cell):
  return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_valid_nbformat_with_cell_ids(name):
  notebook = _load(name)
  assert set(notebook) == {"cells", "metadata", "nbformat", "nbformat_minor"}
  assert notebook["nbformat"] == 4 and notebook["nbformat_minor"] >= 5  # ids need 4.5
  assert isinstance(notebook["metadata"], dict)
  ids = []
  for cell in notebook["cells"]:
    assert cell.get("cell_type") in CELL_KEYS, cell
    assert set(cell) <= CELL_KEYS[cell["cell_type"]], set(cell) - CELL_KEYS[cell["cell_type"]]
    assert isinstance(cell["metadata"], dict)
    source = cell["source"]
    assert isinstance(source, str) or all(isinstance(line, str) for line in source)
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", cell.get("id", "")), cell.get("id")
    ids.append(cell["id"])
    if cell["cell_type"] == "code":
      assert isinstance(cell["outputs"], list)
      assert cell["execution_count"] is None or isinstance(cell["execution_count"], int)
  assert len(ids) == len(set(ids)), "cell ids must be unique"


def _install_cell(monkeypatch, name):
  """The first code cell's source, in a kernel where clmim is missing; pip is stubbed and its
  argument lists recorded in the returned list."""
  import importlib.util
  first = next(c for c in _load(name)["cells"] if c["cell_type"] == "code")
  real_find_spec = importlib.util.find_spec
  def find_spec(name, *args):
    if name == "clmim":
      return None
    return real_find_spec(name, *args)
  monkeypatch.setattr(importlib.util, "find_spec", find_spec)
  calls = []
  monkeypatch.setattr(subprocess, "run", lambda args, check: calls.append(list(args)))
  return _source(first), calls


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_install_cell_asks_for_repo_url_when_clmim_is_missing(monkeypatch, name):
  source, pip_calls = _install_cell(monkeypatch, name)
  with pytest.raises(RuntimeError, match="REPO_URL"):
    exec(compile(source, "install-cell", "exec"), {})
  assert pip_calls == []


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_install_cell_installs_from_repo_url(monkeypatch, name):
  source, pip_calls = _install_cell(monkeypatch, name)
  placeholder = 'REPO_URL = "https://github.com/<your-account>/clmim"'
  assert source.count(placeholder) == 1
  source = source.replace(placeholder, 'REPO_URL = "https://example.org/me/clmim"')
  exec(compile(source, "install-cell", "exec"), {})
  # One install: clmim's dependencies come with it (pyproject.toml).
  assert pip_calls == [[sys.executable, "-m", "pip", "install", "-q",
                        "git+https://example.org/me/clmim"]]


# What each notebook must show at the small settings: (images analysed, figures at least). A
# notebook added to colabs/ needs an entry here, so its small settings are checked too.
EXPECTED = {
    "clmim_demo.ipynb": (64, {
        "attention_distance.png", "nmi.png", "attention_entropy.png", "fourier.png",
        "query_attention_x4y4_mean.png", "query_attention_x4y4_head0.png"}),
    "self_attention_analysis.ipynb": (32, {
        "query_attention_x4y4_block6_head0.png", "query_attention_x4y4_block6_all_heads.png",
        "attention_maps_x4y4.png", "attention_maps_x1y1.png", "attention_distance.png",
        "nmi.png", "attention_entropy.png", "head_similarity.png", "query_similarity.png",
        "depth_similarity.png", "query_map_similarity.png", "rollout_spread.png",
        "rollout_entropy.png", "rollout_map.png"}),
    "representation_analysis.ipynb": (32, {
        "fourier.png", "tsne.png", "tsne_images.png", "tsne_knn_image_accuracy.png",
        "svd_spectrum.png", "effective_rank.png", "token_shift_ratio.png", "svd_projection.png",
        "cka.png", "cka_adjacent.png", "feature_variance.png"}),
}


def test_every_notebook_has_expectations():
  assert sorted(EXPECTED) == NOTEBOOKS


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_code_runs_from_colabs_dir(name, tmp_path):
  code = "\n".join(_source(c) for c in _load(name)["cells"] if c["cell_type"] == "code")
  workdir = tmp_path / "workdir"
  shown = tmp_path / "shown.txt"
  assert len(WORKDIR_LINE.findall(code)) == 1, \
      f"the test rewrites {WORKDIR_LINE.pattern!r}: the notebook must hold it once"
  assert code.count(DISPLAY_LINE) == 1, \
      f"the test rewrites {DISPLAY_LINE!r}: the notebook must hold it once"
  script = WORKDIR_LINE.sub(lambda _: f"WORKDIR = {str(workdir)!r}", code).replace(
      DISPLAY_LINE, SHIM.format(shown=str(shown)))
  path = tmp_path / "notebook.py"
  path.write_text(script)
  # No PYTHONPATH: clmim must come from the pip install, as in Colab. CLMIM_COLAB_SMALL selects
  # the small analysis settings; one CPU device as on a Colab CPU runtime.
  env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
  env.update(CLMIM_COLAB_SMALL="1", MPLBACKEND="Agg", JAX_PLATFORMS="cpu", XLA_FLAGS="")
  before = set(os.listdir(COLABS))
  # Run as a kernel would: the working directory (colabs/) first on sys.path, not the script's.
  runner = f"import runpy; runpy.run_path({str(path)!r}, run_name='__main__')"
  result = subprocess.run([sys.executable, "-c", runner], cwd=COLABS, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert set(os.listdir(COLABS)) == before, "the notebook wrote outside WORKDIR"
  displayed = shown.read_text().splitlines()
  written = sorted(str(workdir / f) for f in os.listdir(workdir) if f.endswith(".png"))
  assert displayed and sorted(displayed) == written, "every figure written is displayed"
  assert all(os.path.getsize(f) > 0 for f in displayed)
  # The small settings really applied (a renamed switch would silently run the full analysis).
  num_images, figures = EXPECTED[name]
  with open(workdir / "results.json") as f:
    results = json.load(f)
  assert results["num_images"] == num_images and not results["config"]["include_untrained"]
  assert {os.path.basename(f) for f in displayed} >= figures
