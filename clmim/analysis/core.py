"""The analysis core: what an analysis module declares, and the registry that finds them.

Every analysis is one module `clmim/analysis/<name>.py` that says everything about itself; the
runner, the jobs, the summary, the figures and the report learn about it only through `load`:

  NAME = "<name>"              # the module's file name; what `config.analyses` lists
  OPTIONS = {"key": default}   # its options (config.analysis_options.<name>.<key>), documented
                               #   in the module docstring; plain scalars, strings or tuples
  RESULTS = (Result(...), ...) # the keys it adds to results.json, with labels and layouts
  def partial_sums(batch: Batch, options: dict) -> dict[str, jnp.ndarray]
      pure jnp, per device: SUMS over the device's images (padding has weight 0), never means;
      the runner psums every entry over devices and adds batches on the host in float64. The
      images' total weight is not the analysis' to count: the runner adds it as sums["count"]
      (`sums_of`), so a partial_sums never returns the key "count"
  def finalize(sums: dict[str, np.ndarray], options: dict) -> dict[str, nested lists]
      divides once (by sums["count"], or counts of its own); returns exactly the keys of RESULTS
  optional:
  def figures(results: dict, options: dict) -> dict[str, Figure]
      file name -> figure, from the run's results.json dict (all models side by side); without
      it, every Result with a `series` gets the shared depth-curve figure
  def check(model, options: dict) -> None
      raises ClmimError before any compute when a model cannot be analysed (e.g. no decoder);
      `model` is the registry's `Model` (its `vit`, `decoder`, `name`, ...)
  def between_models(runs, options: dict, session) -> dict | None
      what the analysis measures between the models of a run, after each was analysed alone
      (cka: CKA between the layers of every two trained models); `runs` = [(model, images)],
      `session` the run's `clmim.analysis.session.Session` (its batching and compiled steps).
      Recorded in results.json as "<NAME>_between_models"; None: nothing to record
  def between_models_figure(value) -> Figure | None
      the figure of that value, saved as <NAME>_between_models.png
  BOOTSTRAP = False            # no bootstrap interval (its statistic is not a mean over the
                               #   images, e.g. t-SNE of a few chosen images); default True
  FIXED_SUMS = ("maps",)       # sums over chosen images, the same in every bootstrap replicate
                               #   (see `clmim.analysis.bootstrap`)

Analyses that need several passes over labelled data (a probe is fitted on training images,
then evaluated) declare, instead of `partial_sums` and `finalize`:

  def check_data(data, options) -> None
      opens every image source it will read (`data` is the model's `clmim.data.labelled.
      ProbeData`) and raises ClmimError when one is missing or has no labels: before any compute
  def measure(model, data, passes, options) -> dict
      runs its passes with `passes.run(stage, images, labels, context, desc)` (a `Stage` is a
      partial_sums/finalize pair streamed like an analysis, see `Stage`) and returns the keys of
      RESULTS that apply to the data (e.g. no texture probe on a folder with one label) and
      "num_images", the number of evaluation images

Per-image selections ("these images", "this query") use `Batch.index`, the image's position in
the stream: a sum over the batch of `(index == chosen) * value` is that image's value, exactly
once, whatever the batching and device count.

Running analyses: `clmim.analysis.runner.Analyzer` streams batches through one compiled step
(a model's forward and every analysis' partial_sums) and finalizes; `clmim.analysis.session.
Session` holds one Analyzer per architecture for the models of a run, runs the multi-pass
analyses' `measure` with a `Passes` (and replays them per bootstrap replicate). The jobs
(`clmim.jobs`) build models and images and hand them to a Session.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import pkgutil
from typing import Any, Callable, Optional, Sequence

import numpy as np

from clmim.analysis.common import image_count
from clmim.errors import ClmimError



@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """Where a model's tokens are: `prefix` tokens (the cls token if `has_cls`, then register
  tokens) before the N = g*g patch tokens, row-major. The paper's models: prefix 1, has_cls.

  Spatial analyses (distance, NMI, maps, Fourier, SVD, ...) read the patch tokens only, their
  attention rows renormalised over the patch keys; cls-based ones read the cls token, which a
  model without one does not have (they report nothing for it, see each analysis)."""
  prefix: int = 1
  has_cls: bool = True

  @classmethod
  def of(cls, vit) -> "TokenLayout":
    """The layout of a `clmim.models.vit.ViT` (the paper's for objects without the fields)."""
    return cls(int(getattr(vit, "num_prefix_tokens", 1)), bool(getattr(vit, "class_token", True)))

  @property
  def num_registers(self) -> int:
    return self.prefix - int(self.has_cls)

  def patches(self, z):
    """The patch tokens of states [b, T, ...] -> [b, N, ...]."""
    return z[:, self.prefix:]

  def patch_attention(self, attn):
    """Patch queries over patch keys of maps [b, heads, T, T] -> [b, heads, N, N]."""
    return attn[:, :, self.prefix:, self.prefix:]

  def num_patches(self, tokens: int) -> int:
    return tokens - self.prefix

  def cls(self, z):
    """The cls token of states [b, T, D] -> [b, D]; a ClmimError for a model without one."""
    if not self.has_cls:
      raise ClmimError("this model has no cls token (class_token=False): its cls-based "
                       "measures are not defined.")
    return z[:, 0]


@dataclasses.dataclass(frozen=True)
class Batch:
  """One device's share of a step, as an analysis' `partial_sums` receives it.

  Attributes:
    zs: 2*depth+1 residual states [b, T, D] (T = layout.prefix + N; for the paper's models cls
      at index 0, then the N patches): the embedding output, then per block the state after
      the attention branch and after the MLP branch (before the final norm).
    attns: depth post-softmax attention maps [b, heads, T, T].
    weights: [b] float32, 1 for real images, 0 for padding.
    index: [b] int32, each image's position in the stream (0 .. num_images - 1), -1 = padding.
    patch_size: the patch side in pixels (static).
    decoder_zs: the pretraining decoder's states when the model has one (see
      `clmim.models.heads.decoder_states`: MAE: its blocks' input, then after-attention and
      after-MLP of each decoder block; SimMIM: its one output), else empty.
    decoder_attns: the decoder blocks' attention maps [b, heads, N+1, N+1] (empty for SimMIM's
      block-less decoder and for models without a decoder).
    images: the model's input [b, H, W, 3] (normalised as the model expects).
    labels: int32 [b, K], each image's row of the pass's label table (-1 = none or padding;
      K = 0 when the pass has no labels).
    context: the pass's replicated pytree (e.g. a fitted probe), or {}.
    forward: `forward(images) -> (zs, attns, ...)` with this step's params, for analyses that
      run the model again on changed inputs (e.g. `robustness`).
    layout: the model's `TokenLayout` (static): which tokens are cls, registers, patches.
  """
  zs: Sequence[Any]
  attns: Sequence[Any]
  weights: Any
  index: Any
  patch_size: int
  decoder_zs: Sequence[Any] = ()
  decoder_attns: Sequence[Any] = ()
  images: Any = None
  labels: Any = None
  context: Any = None
  forward: Optional[Callable] = None
  layout: TokenLayout = TokenLayout()


def per_block_mean_over_heads(values) -> list:
  """[[per head] per block] -> [per block] (the usual depth curve of an attention metric)."""
  return np.asarray(values, np.float64).mean(axis=-1).tolist()


@dataclasses.dataclass(frozen=True)
class Result:
  """One key an analysis adds to results.json["models"][name], and how to show it.

  Attributes:
    key: the results.json key.
    label: axis label / table title, with the unit (e.g. "attention distance (px)").
    layout: what the nested lists index, e.g. "[block][head]" or "[stage][frequency]".
    x: what a depth curve's x axis counts: "block" (1 .. depth), "stage" (0 = embedding, then
      each block), another word for a curve over something else (e.g. "band": drawn by the
      module's own `figures`; the report's finding uses its second half), or None when the
      result is no curve.
    series: values -> one float per x position (the curve the summary, the figures, snapshots
      and the report show), or None.
    reference: the value of an uninformative model (e.g. uniform attention), a float, a
      callable (results_by_model, model_info) -> float or None, or None.
    cl_direction: "higher" or "lower" when the paper finds CL higher / lower than MIM on it (the
      report's CL-like / MIM-like verdict uses the later half of the curve), else None.
    description: one line for the report.
    title: the figure's title (default: the label).
    reference_label: the legend entry of the reference line (e.g. "uniform attention").
    columns: for a curve that is not over depth (x names another axis, e.g. "band"), a callable
      (results) -> the label of each position (the summary's column heads), or None.
    summary: how one number summarises the curve when models are compared along a sweep
      (`clmim.jobs.sweep`, sweep.json): "last" (its last position) or "later" (the mean over
      the later half of the curve, as the report reads it); None: not summarised.
    summary_label: that number's title (default: the label).
  """
  key: str
  label: str
  layout: str
  x: Optional[str] = "block"
  series: Optional[Callable] = per_block_mean_over_heads
  reference: Any = None
  cl_direction: Optional[str] = None
  description: str = ""
  title: str = ""
  reference_label: str = ""
  columns: Optional[Callable] = None
  summary: Optional[str] = None
  summary_label: str = ""


@dataclasses.dataclass(frozen=True)
class Stage:
  """One pass of a multi-pass analysis, in the shape the runner streams (`NAME`, `OPTIONS`,
  `partial_sums`, `finalize`).

  Attributes:
    NAME: a name unique within the pass.
    key: hashable; the job compiles one step per (architecture, key), so stages with the same
      key must have the same `partial_sums` (settings that change its shapes belong in it).
    partial_sums, finalize: as in the module protocol (finalize defaults to returning the
      float64 sums); the options are `OPTIONS`.
    OPTIONS: the settings `partial_sums` and `finalize` read (static).
  """
  NAME: str
  key: Any
  partial_sums: Callable
  finalize: Callable = lambda sums, options: sums  # the measure divides, with what it knows
  OPTIONS: dict = dataclasses.field(default_factory=dict)
  BOOTSTRAP: bool = True  # False for a pass that fits (the fit is held fixed in the replicates)
  FIXED_SUMS: tuple = ()


def is_multi_pass(module) -> bool:
  """True for an analysis that runs its own passes (`measure`) instead of one stream."""
  return hasattr(module, "measure")


COUNT = "count"  # the images' total weight in every analysis' (and stage's) sums


def sums_of(module, batch: "Batch", options: dict) -> dict:
  """`module.partial_sums` of `batch` with the images' total weight under COUNT: what the
  runner adds up over devices and batches (and folds) and hands to `finalize`."""
  sums = dict(module.partial_sums(batch, options))
  if COUNT in sums:
    raise ClmimError(f"analysis {module.NAME!r}: partial_sums returns {COUNT!r}, the key the "
                     f"runner adds (the images' total weight); name a count of its own "
                     f"otherwise.")
  sums[COUNT] = image_count(batch.weights)
  return sums


def between_models_key(module) -> str:
  """The results.json key of `module`'s between-models value (see the module docstring)."""
  return f"{module.NAME}_between_models"


def available() -> list[str]:
  """Names of every analysis module in clmim/analysis/: the modules that declare themselves
  one (a NAME equal to the file's name, and RESULTS); helpers (runner, plots, probes, noise,
  ...) declare neither."""
  import clmim.analysis as package
  names = []
  for info in pkgutil.iter_modules(package.__path__):
    if info.name.startswith("_"):
      continue
    module = importlib.import_module(f"clmim.analysis.{info.name}")
    if getattr(module, "NAME", None) == info.name and hasattr(module, "RESULTS"):
      names.append(info.name)
  return sorted(names)


def load(name: str):
  """The analysis module `name`, checked to declare the protocol above."""
  names = available()
  if name not in names:
    raise ClmimError(f"config.analyses: unknown analysis {name!r}; expected some of "
                     f"{', '.join(names)}.")
  module = importlib.import_module(f"clmim.analysis.{name}")
  needs = ("measure", "check_data") if is_multi_pass(module) else ("partial_sums", "finalize")
  missing = [a for a in ("NAME", "RESULTS", "OPTIONS") + needs if not hasattr(module, a)]
  if missing or module.NAME != name:
    raise ClmimError(f"clmim/analysis/{name}.py is not an analysis module (missing "
                     f"{missing or ['NAME == ' + repr(name)]}).")
  return module


def load_all(names) -> list:
  """Modules for a comma-separated string or a list of names (at least one)."""
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",") if n.strip()]
  if not names:
    raise ClmimError(f"config.analyses is empty; expected some of {', '.join(available())}.")
  return [load(n) for n in names]


def resolve_options(module, given: Optional[dict]) -> dict:
  """The module's OPTIONS overridden by `given`; an unknown option is an error."""
  given = dict(given or {})
  unknown = sorted(set(given) - set(module.OPTIONS))
  if unknown:
    raise ClmimError(f"config.analysis_options.{module.NAME}: unknown option {unknown[0]!r} "
                     f"(expected some of {', '.join(sorted(module.OPTIONS)) or 'none'}).")
  return {**module.OPTIONS, **{k: _literal(v) for k, v in given.items()}}


def _literal(value):
  """A text value that is a Python literal becomes that literal ("0" -> 0, "(1, 2)" -> (1, 2)).

  The command line can only give a config field a value of the field's own type, so an option
  whose default is a word ("mean") but that also takes a number or a tuple arrives as text.
  Words that are no literal ("mean", "last") stay text.
  """
  if not isinstance(value, str):
    return value
  try:
    return ast.literal_eval(value.strip())
  except (ValueError, SyntaxError, MemoryError, RecursionError):
    return value


def results_of(module) -> dict:
  """{key: Result} of a module."""
  return {r.key: r for r in module.RESULTS}


def reference_value(result: Result, results: dict) -> Optional[float]:
  """The Result's reference for a whole run's results.json dict, or None."""
  if callable(result.reference):
    return result.reference(results)
  return result.reference
