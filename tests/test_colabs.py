"""The Colab notebooks are valid nbformat 4.5 and run as written, from `colabs/`, with clmim found
only through its (editable) pip install -- no PYTHONPATH, no reliance on the repository root.

Their text cannot go stale: the committed notebooks carry no outputs, their markdown states no
result (numbers, pixel values, block-wise claims: `result_claims`), and what a run shows is
printed by readings (`clmim.jobs.readings`) whose every number is a value of the run's
results.json (`untraced_numbers`), checked on the executed notebooks."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from clmim.analysis import core
from clmim.jobs import readings, report

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


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs(name):
  """Outputs would be a second, unchecked copy of a run's numbers: the notebooks are committed
  clean, and the readings are checked when the tests execute them."""
  for cell in _load(name)["cells"]:
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, cell["id"]


# What the notebooks' markdown (and docs/colabs.md's prose) may not state: anything that reads
# like a result of a run, which would go stale with the next models. A result is printed by a
# reading instead. The patterns flag decimals, pixel values, numbered blocks / stages / heads /
# images, percentages, approximate values and comparisons over every block. (A how-to-read
# text may name a metric's fixed points, "near 0" or "1 = uniform": they hold for any run.)
RESULT_LIKE = {
    "a decimal number": r"\d+\.\d+",
    "a pixel value": r"\d+\s*px\b",
    "a numbered block, stage, layer, head or image": r"\b(?:blocks?|stages?|layers?|heads?|images?)"
                                                     r"\s+\d+",
    "a percentage": r"\d\s*%",
    "an approximate value": r"(?:≈|~|\babout|\baround)\s*-?\d",
    "a comparison over every block": r"\b(?:above|below|higher|lower|larger|smaller)\b[^.]{0,80}?"
                                     r"\b(?:in|at) (?:every|each|all) (?:blocks?|stages?|depths?|"
                                     r"layers?)\b",
}
# Fixed facts of the set-up, which the text may state (those a pattern above would flag are
# what makes this list necessary; the rest document what is meant to stay): the demo models'
# 32 px images, 4 px patches and 8 x 8 grid, the paper models' 224 px and 14 x 14, the official
# notebooks' head 0, 1/64 of each class, 18 t-SNE images, perplexity 20 and 1000 iterations;
# stage 0 is the embedding.
SETUP_FACTS = ("32 px", "4 px", "224 px", "8 × 8", "14 × 14", "512 held-out images", "head 0",
               "1/64", "1/18", "18 images", "perplexity 20", "1000 iterations", "k = 5",
               "stage 0")


def result_claims(text):
  """The phrases of `text` that state a result ([(what, phrase)]), set-up facts left out."""
  for fact in SETUP_FACTS:
    text = text.replace(fact, " ")
  return [(what, m.group(0)) for what, pattern in RESULT_LIKE.items()
          for m in re.finditer(pattern, text, re.IGNORECASE)]


def test_result_claims_flag_the_stale_sentences_and_pass_set_up_facts():
  stale = ["MoCo's distance (about 15-17 px) is above SimMIM's (about 12-13 px) in every block",
           "MoCo's peaks in block 2 (0.05) and falls to about 0 from block 5 on",
           "a token's image is read off almost perfectly from block 4 on (k-NN accuracy 0.997)",
           "effective rank 4.5 in block 6", "the dotted line (16.5 px)",
           "that shared map lands mostly on border tokens (images 0, 1 and 3)",
           "one (head 3) looks at the background", "SimMIM's ΔlogA is above MoCo's at every depth",
           "MoCo keeps 95 % of its variance", "NMI ≈ 0"]
  for sentence in stale:
    assert result_claims(sentence), sentence
  facts = ("32 px procedural images, 4 px patches, an 8 × 8 grid; 224 px and a 14 × 14 grid; "
           "512 held-out images; head 0 as the official notebook; 1/64 of each class; 18 images, "
           "perplexity 20, 1000 iterations, k = 5, chance 1/18; 6 blocks, 4 heads; ICLR 2023; "
           "the leave-one-out accuracy at every stage; (1 = uniform rows)")
  assert result_claims(facts) == []


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_markdown_states_no_results(name):
  claims = {cell["id"]: result_claims(_source(cell)) for cell in _load(name)["cells"]
            if cell["cell_type"] == "markdown"}
  assert not any(claims.values()), {k: v for k, v in claims.items() if v}


def test_colabs_doc_states_no_results():
  """docs/colabs.md's prose (its table holds measured CPU times, with the machine named)."""
  with open(os.path.join(ROOT, "docs", "colabs.md"), encoding="utf-8") as f:
    prose = "\n".join(line for line in f.read().splitlines() if not line.startswith("|"))
  assert result_claims(prose) == []


def _demo_data_versions():
  """{demo model: the generator version its manifest says it was trained on}."""
  folder = os.path.join(ROOT, "clmim", "demo_checkpoints")
  versions = {}
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name, "manifest.json")) as f:
      versions[name] = json.load(f)["data_version"]
  return versions


def test_demo_draws_the_images_the_models_were_trained_on():
  """The tour's query maps are drawn on the run's images (config.data, whose generator version is
  the demo models'), not on a generator built with its own default version."""
  from clmim import config_lib
  code = "\n".join(_source(c) for c in _load("clmim_demo.ipynb")["cells"]
                   if c["cell_type"] == "code")
  assert "ShapesTextures(" not in code and "EvalImages(config.data," in code
  version = config_lib.analysis_base("demo", name="x", analyses="nmi").data.version
  assert set(_demo_data_versions().values()) == {version}


READING = re.compile(r"^\[reading: ([\w, ]+)\] .*?(?:\n(?=\n)|\Z)", re.MULTILINE | re.DOTALL)


def printed_readings(output):
  """{first key: (keys, text)} of every reading in a notebook's printed output."""
  found = {}
  for match in READING.finditer(output):
    keys = [k.strip() for k in match.group(1).split(",")]
    found[keys[0]] = (keys, match.group(0))
  return found


def _numbers(value):
  """Every finite number in a nested list / dict of results.json."""
  if isinstance(value, dict):
    return [x for v in value.values() for x in _numbers(v)]
  if isinstance(value, (list, tuple)):
    return [x for v in value for x in _numbers(v)]
  if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
    return [float(value)]
  return []


def traceable_values(results, keys):
  """What a reading of `keys` may quote, from results.json and the declarations: every stored
  value, the declared series (e.g. means over heads) and their later-half means, the reference,
  the stored findings' numbers (intervals, gaps, shifts)."""
  values = []
  for key in keys:
    _, result = readings.declaration(key)
    for model in results["models"].values():
      if key in model:
        values += _numbers(model[key])
        if result.series is not None:
          values += [float(v) for v in result.series(model[key])]
          values.append(report.later_half(result, model[key]))
    reference = core.reference_value(result, results)
    if reference is not None:
      values.append(float(reference))
    values += [x for f in results.get("findings", []) if f["key"] == key for x in _numbers(f)]
  return np.asarray(values)


def untraced_numbers(text, keys, results):
  """The decimals quoted in a reading of `keys` that are no value of results.json (at the
  quoted precision); model names and a curve's position labels (e.g. a noise band "0.4π") are
  left out."""
  labels = []
  for key in keys:
    result = readings.declaration(key)[1]
    if result.columns is not None:
      labels += [f"{result.x} {label}" for label in result.columns(results) or []]
  for name in sorted(list(results["models"]) + labels, key=len, reverse=True):
    text = text.replace(name, " ")
  values = traceable_values(results, keys)
  untraced = []
  for quoted in re.findall(r"-?\d+\.\d+", text):
    places = len(quoted.split(".")[1])
    if not np.any(np.abs(values - float(quoted)) <= 0.5 * 10 ** -places + 1e-9):
      untraced.append(quoted)
  return untraced


def test_readings_of_a_whole_demo_run_quote_its_results():
  """Every reading of docs/demo/results.json (every curve, the attention maps) traces to it; a
  changed number does not."""
  with open(os.path.join(ROOT, "docs", "demo", "results.json")) as f:
    results = json.load(f)
  keys = sorted({key for model in results["models"].values() for key in model
                 if key in readings._declarations() and model[key] is not None and (
                     key == "attention_maps" or readings.declaration(key)[1].series)})
  assert len(keys) > 20
  for key in keys:
    text = readings.reading(results, key)
    (quoted, body), = printed_readings(text).values()
    assert quoted[0] == key and re.search(r"\d\.\d{3}", body), text
    assert untraced_numbers(body, quoted, results) == [], text
  text = readings.reading(results, "attention_distance")
  value = f"{np.mean(results['models']['moco_v3_demo']['attention_distance'][-1]):.3f}"
  assert value in text
  stale = text.replace(value, f"{float(value) + 0.01:.3f}")
  assert untraced_numbers(stale, ["attention_distance"], results) == [
      f"{float(value) + 0.01:.3f}"]
  # A number of another key is no trace either.
  nmi = f"{results['models']['moco_v3_demo']['nmi'][0][0]:.3f}"
  assert untraced_numbers(f"x {nmi}", ["rollout_spread"], results) == [nmi]


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
        "object_attention_cls.png", "object_attention_patches.png",
        "query_attention_x4y4_mean.png", "query_attention_x4y4_head0.png",
        "query_attention_x1y1_mean.png", "attention_maps_x4y4.png"}),
    "self_attention_analysis.ipynb": (32, {
        "query_attention_x4y4_block6_head0.png", "query_attention_x4y4_block6_all_heads.png",
        "attention_maps_x4y4.png", "attention_maps_x1y1.png", "attention_distance.png",
        "nmi.png", "attention_entropy.png", "head_similarity.png", "query_similarity.png",
        "depth_similarity.png", "query_map_similarity.png", "rollout_spread.png",
        "rollout_entropy.png", "rollout_map.png", "object_attention_cls.png",
        "object_attention_patches.png"}),
    "representation_analysis.ipynb": (32, {
        "fourier.png", "tsne.png", "tsne_images.png", "tsne_knn_image_accuracy.png",
        "svd_spectrum.png", "effective_rank.png", "token_shift_ratio.png", "svd_projection.png",
        "cka.png", "cka_adjacent.png", "feature_variance.png"}),
}
# The readings each notebook prints (by their first key), one per figure or group of figures.
READINGS = {
    "clmim_demo.ipynb": {"attention_distance", "nmi", "attention_entropy", "fourier",
                         "object_attention_cls", "object_attention_patches", "attention_maps"},
    "self_attention_analysis.ipynb": {
        "attention_maps", "object_attention_cls", "object_attention_patches",
        "attention_distance", "nmi", "attention_entropy", "head_similarity", "query_similarity",
        "depth_similarity", "query_map_similarity", "rollout_spread", "rollout_entropy"},
    "representation_analysis.ipynb": {
        "fourier", "tsne_knn_image_accuracy", "effective_rank", "token_shift_ratio",
        "cka_adjacent", "feature_variance"},
}


def test_every_notebook_has_expectations():
  assert sorted(EXPECTED) == NOTEBOOKS == sorted(READINGS)


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
  # the small analysis settings; one CPU device as on a Colab CPU runtime (LLVM at -O0 as in
  # conftest: compiling the tiny models' steps is much of the run; what it shows is the same).
  env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
  env.update(CLMIM_COLAB_SMALL="1", MPLBACKEND="Agg", JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_backend_optimization_level=0")
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
  if name == "clmim_demo.ipynb":  # the images drawn are of the version the models know
    version, = set(_demo_data_versions().values())
    assert f"images: synthetic shapes x textures, version {version}," in result.stdout
  # Each figure's reading is printed, and every number it quotes is this run's.
  printed = printed_readings(result.stdout)
  assert set(printed) == READINGS[name], result.stdout[-3000:]
  for keys, text in printed.values():
    assert "not in this run's results" not in text, text
    assert untraced_numbers(text, keys, results) == [], text
