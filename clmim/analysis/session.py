"""The analysis engine every job runs analyses with: a `Session` runs the analyses of a config
over models, sharing one compiled step per architecture (an untrained copy costs no compilation),
with the bootstrap's fold draws shared by every model; `Passes` is what a multi-pass analysis'
`measure` runs its passes with; `ReplayedPasses` replays those passes per bootstrap replicate.

Models are duck-typed (`clmim.checkpoints.registry.Model`: name, vit, params, family, source,
info, preprocessing and an optional decoder) and so are images (`clmim.data.eval_data.
EvalImages`: len, description, load_batches): `clmim.analysis` never imports the data or the
checkpoints (core.py, "Running analyses").
"""
from __future__ import annotations

import functools
import time

import jax

from clmim.analysis import attention_distance, bootstrap, core
from clmim.analysis import decoder as decoder_analysis
from clmim.analysis.runner import Analyzer
from clmim.errors import ClmimError
from clmim.models.heads import forward_with_decoder
from clmim.models.vit import forward_with_states, vit_fields


class Session:
  """Runs analyses over models, sharing one compiled step per architecture.

  `analyze(model, images)` returns (results of that model, its model_info entry).
  """

  def __init__(self, modules, options, batch_size: int, progress: bool, max_batches: int = 0,
               folds: int = 0, replicates: int = 1000, seed: int = 0):
    # Multi-pass analyses (probing, robustness) run their own passes (`measure`); the others
    # share the one stream per model.
    self.modules = [m for m in modules if not core.is_multi_pass(m)]
    self.multi_pass = [m for m in modules if core.is_multi_pass(m)]
    self.options = options
    self.device_batch = batch_size // jax.device_count()  # exact: preflight checked it
    self.progress, self.max_batches = progress, max_batches
    self._analyzers = {}
    # Bootstrap (clmim.analysis.bootstrap): one set of fold draws for every model, so that
    # differences between models are resampled paired.
    bootstrap.check_settings(folds, replicates, seed)
    self.folds = int(folds)
    self.draws = bootstrap.draws(folds, replicates, seed) if folds else None
    self.replicates = {}  # {model name: {result key: [R, positions]}}
    self.not_resampled = {}  # {analysis: why it has no interval}

  def analyzer(self, model) -> Analyzer:
    """The Analyzer of `model`'s architecture, its decoder's included (built once: models of one
    architecture share the jit-compiled step, so an untrained copy costs no compilation)."""
    vit, decoder = model.vit, getattr(model, "decoder", None)
    key = tuple(sorted(vit_fields(vit).items()))
    if decoder is None:
      forward = functools.partial(forward_with_states, vit)
    else:
      # The decoder runs in the same step, on the encoder's output (params become
      # {"encoder", "decoder"}, see `analyze`).
      feed = None
      if any(m.NAME == decoder_analysis.NAME for m in self.modules):
        feed = decoder_analysis.feed(model, self.options[decoder_analysis.NAME])
      key += (("decoder", decoder["kind"], tuple(sorted(decoder["config"].items())),
               tuple(sorted((feed or {}).items()))),)
      forward = functools.partial(forward_with_decoder, vit, decoder["kind"], decoder["config"],
                                  feed=feed)
      forward.takes_index = feed is not None  # per-image masks from the stream position
    if key not in self._analyzers:
      self._analyzers[key] = Analyzer(forward, self.modules, vit.patch_size,
                                      device_batch_size=self.device_batch, options=self.options,
                                      folds=self.folds, layout=core.TokenLayout.of(vit))
    return self._analyzers[key]

  def extra_analyzer(self, key, forward, modules, patch_size, options, folds=0,
                     layout=None) -> Analyzer:
    """An Analyzer for another pass over the same data (e.g. two models at once, see
    `between_models`), with this session's batching and counted in its compilations."""
    if key not in self._analyzers:
      self._analyzers[key] = Analyzer(forward, modules, patch_size,
                                      device_batch_size=self.device_batch, options=options,
                                      folds=folds, layout=layout)
    return self._analyzers[key]

  def stage_analyzer(self, model, stage) -> Analyzer:
    """The Analyzer of one multi-pass stage on `model`'s architecture (encoder only)."""
    key = ("stage", stage.key) + tuple(sorted(vit_fields(model.vit).items()))
    return self.extra_analyzer(key, functools.partial(forward_with_states, model.vit), [stage],
                               model.vit.patch_size, {stage.NAME: stage.OPTIONS},
                               folds=self.folds, layout=core.TokenLayout.of(model.vit))

  def stream(self, analyzer: Analyzer, images, params, desc: str, quiet: bool = False,
             labels=None, context=None) -> dict:
    """Every image of `images` (up to config.data.max_batches steps) through `analyzer`, with
    the multi-process plan: what every pass of the job runs. `labels` and `context` go to
    `Analyzer.run`."""
    num_images = len(images)
    if self.max_batches:
      num_images = min(num_images, self.max_batches * analyzer.global_batch_size)
    plan = analyzer.plan(num_images)
    if jax.process_index() == 0 and not quiet:
      capped = f" (first {num_images}: max_batches={self.max_batches})" \
          if num_images < len(images) else ""
      print(f"{desc}: {images.description}{capped}")
    batches = images.load_batches(plan.local_indices, analyzer.local_batch_size)
    return analyzer.run(params, batches, progress=self.progress and not quiet, plan=plan,
                        desc=desc, labels=labels, context=context)

  def _replayed(self, module, model, probe_data, passes) -> dict:
    """{result key: [R, positions]}: the multi-pass `module`'s measure run again per bootstrap
    replicate on its passes' resampled sums (no compute on the devices: `ReplayedPasses`)."""
    if not bootstrap.resampled(module):
      self.not_resampled[module.NAME] = "its statistic is not a mean over the images"
      return {}
    outputs = []
    for counts in self.draws:
      try:
        outputs.append(module.measure(model, probe_data, ReplayedPasses(passes, counts),
                                      self.options[module.NAME]))
      except (ClmimError, ArithmeticError, ValueError):
        outputs.append({})
    for name, why in passes.unfolded.items():
      self.not_resampled.setdefault(f"{module.NAME} ({name})", why)
    return bootstrap.curves(module, outputs)

  @property
  def compilations(self) -> int:
    return sum(a.compilations for a in self._analyzers.values())

  @property
  def compile_seconds(self) -> float:
    return sum(a.compile_seconds for a in self._analyzers.values())

  def analyze(self, model, images, params=None, quiet=False, probe_data=None) -> tuple[dict,
                                                                                     dict]:
    """Runs every analysis on `model`: the one-stream analyses over `images`, then each
    multi-pass analysis' `measure` with `probe_data` (the model's `ProbeData`)."""
    started = time.time()
    params = model.params if params is None else params
    out, replicates = {}, {}
    if self.modules:
      both = params
      if getattr(model, "decoder", None) is not None:
        both = {"encoder": params, "decoder": model.decoder["params"]}
        if "mask_token" in model.decoder:
          both["mask_token"] = model.decoder["mask_token"]
      analyzer = self.analyzer(model)
      out = self.stream(analyzer, images, both, model.name, quiet)
      if self.folds:
        replicates = analyzer.replicate_curves(self.draws)
      self.not_resampled.update(analyzer.unfolded)
    passes = Passes(self, model, params, quiet)
    for module in self.multi_pass:
      measured = dict(module.measure(model, probe_data, passes, self.options[module.NAME]))
      evaluated = measured.pop("num_images")  # its evaluation images (not its training ones)
      out.update(measured)
      out.setdefault("num_images", evaluated)
      if self.folds:
        replicates.update(self._replayed(module, model, probe_data, passes))
    if self.folds:
      self.replicates[model.name] = replicates
    vit = model.vit
    info = {"family": model.family, "source": model.source, **model.info,
            "image_size": vit.image_size, "patch_size": vit.patch_size, "depth": vit.depth,
            "num_heads": vit.num_heads,
            # Which tokens the analyses read: spatial ones the patches only (docs/definitions.md).
            "token_layout": {"cls_token": vit.class_token, "registers": vit.num_registers},
            "uniform_attention_distance": attention_distance.uniform_attention_distance(
                vit.grid, vit.patch_size),
            "preprocessing": model.preprocessing, "data": images.description,
            "seconds": round(time.time() - started, 2)}
    return out, info


class Passes:
  """What a multi-pass analysis' `measure` runs its passes with, for one model.

  `run(stage, images, labels, context, desc)` streams `images` (an `EvalImages`) through the
  model and `stage` on all devices (one compiled step per architecture and stage key) and
  returns the stage's `finalize` output; `cache` holds what several analyses of this model
  share (e.g. fitted probes).
  """

  def __init__(self, session: Session, model, params, quiet: bool):
    self.session, self.model, self.params, self.quiet = session, model, params, quiet
    self.cache = {}
    # Every pass run, for the bootstrap's replay: {(stage name, key, desc): [(stage, output,
    # totals, fold sums), ...]} in the order they ran.
    self.recorded, self.unfolded = {}, {}

  def run(self, stage, images, labels, context, desc: str) -> dict:
    analyzer = self.session.stage_analyzer(self.model, stage)
    out = self.session.stream(analyzer, images, self.params, f"{self.model.name}: {desc}",
                              self.quiet, labels=labels, context=context)
    self.recorded.setdefault((stage.NAME, stage.key, desc), []).append(
        (stage, out, analyzer.totals.get(stage.NAME), analyzer.fold_sums.get(stage.NAME)))
    self.unfolded.update(analyzer.unfolded)
    return out


class ReplayedPasses:
  """`Passes` for one bootstrap replicate: `run` returns, for the same call (stage, desc and
  occurrence) of the real measure, the stage finalized on the replicate's resampled sums
  (`counts`: fold draws); a pass that was not resampled (a fit) returns its real output. The
  cache (fitted probes) is the real run's, so nothing is fitted again."""

  def __init__(self, passes: Passes, counts):
    self.cache, self._recorded, self._counts = passes.cache, passes.recorded, counts
    self._seen = {}

  def run(self, stage, images, labels, context, desc: str) -> dict:
    key = (stage.NAME, stage.key, desc)
    occurrence = self._seen.get(key, 0)
    self._seen[key] = occurrence + 1
    calls = self._recorded.get(key, [])
    if occurrence >= len(calls):
      raise ClmimError(f"bootstrap replay: pass {desc!r} was not run by the real measure.")
    recorded_stage, output, totals, folded = calls[occurrence]
    if folded is None:
      return output
    sums = bootstrap.replicate_sums(folded, totals, self._counts)
    return recorded_stage.finalize(sums, recorded_stage.OPTIONS)
