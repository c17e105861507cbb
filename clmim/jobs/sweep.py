"""The λ sweep of the CL + MIM hybrid: one model per λ, then one analysis run over all of them.

  python -m clmim.main --config configs/pretrain_hybrid.py --config.mode=sweep --workdir runs/sweep

For each λ of `config.sweep.weights` it trains the hybrid recipe with `config.hybrid.weight = λ`
in workdir/lambda_<λ>/ (an ordinary pretraining workdir: resumable, its own metrics.jsonl and
export/; a finished one is not trained again), then runs `config.sweep.analyses` on every export
and an untrained copy of the architecture, on `config.sweep.num_images` held-out procedural
images (probes: `config.sweep.num_train_images` training images), in workdir/analysis/ (the
analysis job's results.json, figures and report). workdir/sweep.json and sweep.png hold what the
paper's Sec. 5 plots against λ, the results its analyses mark with a `summary`: last-block shape
and texture probes (mean patch token), NMI and high-frequency ΔlogA (means over the later half
of the blocks). Everything a λ needs — its
value, its workdir's config record, the analyses — is checked before the first one trains.
With `config.sweep.seeds` = N > 1 every λ is trained N times (training seeds config.seed,
config.seed + 1, ...): seed 0 is the one-seed sweep's member (workdir/lambda_<λ>/, model
"hybrid_lambda_<λ>", so raising N reuses a finished sweep), seed i > 0 trains in
workdir/lambda_<λ>_seed<i>/ as model "hybrid_lambda_<λ>_seed<i>";
sweep.json then holds the mean over seeds per λ, each seed's value ("<key>_seeds") and their
standard deviation ("<key>_spread"), which sweep.png draws as the error bars.
The endpoints carry their families — λ = 0 (SimMIM alone) "mim", λ = 1 (MoCo v3 alone) "cl" —
so the report's findings compare them (with intervals and verdicts, `clmim.jobs.verdicts`); the
λ between are family "other".
"""
from __future__ import annotations

import os

import jax
import numpy as np
from matplotlib.figure import Figure

from clmim import config_lib, preflight
from clmim.atomic import save_figure_atomic, write_json_atomic
from clmim.errors import ClmimError
from clmim.analysis import core, plots
from clmim.config_checks import check_int
from clmim.jobs import analyze, pretrain, report
from clmim.jobs.analyze import analysis_setup
from clmim.train import objectives

def weights(config) -> list[float]:
  """config.sweep.weights as floats, each in [0, 1] and distinct, or one error line."""
  values = list(config.sweep.weights)
  if not values or any(not isinstance(w, (int, float)) or isinstance(w, bool)
                       or not 0 <= w <= 1 for w in values) or len(set(values)) != len(values):
    raise ClmimError(f"config.sweep.weights={tuple(values)}: expected distinct λ values in "
                     f"[0, 1], e.g. (0, 0.25, 0.5, 0.75, 1).")
  return [float(w) for w in values]


def family(weight: float, default: str = "other") -> str:
  """The family of the model a λ trains: λ = 0 is SimMIM alone ("mim"), λ = 1 MoCo v3 alone
  ("cl"), anything between the hybrid (`default`, the config's family: "other")."""
  return {0.0: "mim", 1.0: "cl"}.get(float(weight), default)


def seeds(config) -> int:
  """config.sweep.seeds: how many training seeds per λ (>= 1), or one error line."""
  count = config.sweep.get("seeds", 1)
  if isinstance(count, bool) or not isinstance(count, int) or count < 1:
    raise ClmimError(f"config.sweep.seeds={count!r}: expected a whole number >= 1 (training "
                     "seeds per λ).")
  return count


def member_name(weight: float, seed: int) -> str:
  """The model name of λ = `weight`, training seed number `seed` (0: the one-seed name)."""
  return f"hybrid_lambda_{weight:g}" + (f"_seed{seed}" if seed else "")


def member_folder(workdir: str, weight: float, seed: int) -> str:
  """Where λ = `weight`, training seed number `seed`, trains (seed 0: lambda_<λ>/)."""
  return os.path.join(workdir, f"lambda_{weight:g}" + (f"_seed{seed}" if seed else ""))


def member_config(config, weight: float, seed: int = 0):
  """The pretraining config of one λ (and training seed number `seed`: config.seed + seed):
  the hybrid recipe with hybrid.weight = λ, its family that of λ (`family`: the endpoints are
  MIM and CL, so the report compares them)."""
  member = config.copy_and_resolve_references()
  member.unlock()
  member.mode = "pretrain"
  member.name = member_name(weight, seed)
  member.family = family(weight, config.family)
  member.hybrid.weight = weight
  member.seed = config.seed + seed
  member.lock()
  return member


def analysis_config(config, exports: list[str]):
  """The analysis run over the exports (and an untrained copy of their architecture)."""
  analysis = config_lib.analysis_base("demo", name="sweep", analyses=config.sweep.analyses)
  analysis.models = ",".join(exports + [f"random:{exports[0]}"])
  analysis.include_untrained = False
  analysis.data = config_lib.held_out_data(config, config.sweep.num_images)
  analysis.probe_data.num_images = config.sweep.num_train_images
  analysis.progress = False
  analysis.overwrite = True
  analysis.compilation_cache = config.compilation_cache
  return analysis


def summarised(analyses=None) -> list:
  """The Results sweep.json holds per λ: those the analyses (a list of names; default: every
  analysis) mark with a `summary` (`clmim.analysis.core.Result`), in the analyses' order."""
  modules = core.load_all(list(analyses) if analyses is not None else core.available())
  return [result for module in modules for result in module.RESULTS if result.summary]


def _reduce(result, values) -> float:
  if result.summary == "last":
    return float(np.asarray(values, np.float64)[-1])
  return report.later_half(result, values)  # the report's own reading of a depth curve


def summarise(results: dict, names: dict) -> dict:
  """{"weights": [...], key: [one number per λ], key + "_untrained": number} from the analysis
  results; `names` maps each λ to its model's name there, or to the names of its seeds: then
  key is the mean over seeds, key + "_seeds" [λ][seed] each seed's value and, with two or more
  seeds, key + "_spread" their standard deviation (ddof 1)."""
  names = {w: [n] if isinstance(n, str) else list(n) for w, n in names.items()}
  out = {"weights": sorted(names)}
  members = {n for group in names.values() for n in group}
  untrained = [n for n in results["models"] if n not in members]
  details = [m["probing_details"] for m in results["models"].values() if "probing_details" in m]
  if details:  # the probes' test-set size: their binomial standard errors in the figure
    out["probe_evaluation_images"] = int(details[0]["targets"]["shape"]["evaluation_images"])
  count = max(len(group) for group in names.values())
  if count > 1:
    out["seeds"] = count
  for result in summarised(results.get("analyses")):
    key = result.key
    per_model = {n: m[key] for n, m in results["models"].items() if key in m}
    if not per_model:
      continue
    values = [[_reduce(result, per_model[n]) for n in names[w]] for w in out["weights"]]
    out[key] = [float(np.mean(v)) for v in values]
    if count > 1:
      out[key + "_seeds"] = values
      out[key + "_spread"] = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in values]
    if untrained and untrained[0] in per_model:
      out[key + "_untrained"] = _reduce(result, per_model[untrained[0]])
  return out


def probe_standard_errors(accuracies, num_images: int) -> np.ndarray:
  """Binomial standard error sqrt(p (1 - p) / n) of accuracies measured on n test images."""
  p = np.asarray(accuracies, np.float64)
  return np.sqrt(p * (1 - p) / num_images)


def figure(summary: dict) -> Figure:
  """One panel per summary against λ; the untrained copy as a dashed line. Error bars: with
  several seeds, ±1 standard deviation over them (each seed a small dot); with one, probe
  accuracies get ±1 binomial standard error (differences inside the bars are noise of the test
  set) and the other panels none."""
  labels = {r.key: r.summary_label or r.label for r in summarised()}
  keys = [(k, labels[k]) for k in summary if k in labels]  # summarise's order
  fig = Figure(figsize=(3.6 * len(keys), 3.2), layout="constrained")
  for ax, (key, label) in zip(fig.subplots(1, len(keys), squeeze=False)[0], keys):
    n = summary.get("probe_evaluation_images") if key.startswith("probe_") else None
    errors = probe_standard_errors(summary[key], n) if n else None
    if key + "_spread" in summary:
      errors = summary[key + "_spread"]
      for weight, values in zip(summary["weights"], summary[key + "_seeds"]):
        ax.plot([weight] * len(values), values, ".", color="tab:purple", alpha=0.4)
    ax.errorbar(summary["weights"], summary[key], yerr=errors, marker="o", capsize=3,
                color="tab:purple")
    if key + "_untrained" in summary:
      ax.axhline(summary[key + "_untrained"], ls="--", color="grey", label="untrained")
      plots.add_legend(ax, fontsize=8)  # a dashed handle for the dashed line
    ax.set_xlabel("λ (0 = SimMIM only, 1 = MoCo v3 only)")
    ax.set_title(label, fontsize=10)
  return fig


def run(config, workdir: str, invocation: dict | None = None) -> dict:
  """Trains every λ (resuming any started), analyses them together; returns sweep.json's dict."""
  if config.get("objective") != "hybrid" or "sweep" not in config:
    raise ClmimError(f"config.mode='sweep' needs configs/pretrain_hybrid.py (its hybrid.weight is "
                     f"what is swept); this config's objective is {config.get('objective')!r}.")
  preflight.check_run(config, workdir, jax.device_count())  # each λ's folder: below
  lambdas, count = weights(config), seeds(config)
  check_int(config, "sweep.num_images", 1)
  check_int(config, "sweep.num_train_images", 1)
  analysis_setup(config.sweep.analyses, None)  # unknown analysis names fail here, not after training
  runs = [(w, i) for w in lambdas for i in range(count)]
  members = {run: member_config(config, *run) for run in runs}
  folders = {(w, i): member_folder(workdir, w, i) for w, i in runs}
  for run, member in members.items():  # every member checked before any trains
    preflight.check_fields(member, "pretrain", jax.device_count())
    preflight.check_resume(member, folders[run])
    objectives.load(member)  # its own field checks (λ, mask token, mask patch)
  for run, member in members.items():
    export = os.path.join(folders[run], "export")
    done = preflight.checkpoint_steps(folders[run])
    if not (os.path.isdir(export) and done and max(done) >= member.total_steps):
      pretrain.run(member, folders[run], {**(invocation or {}), "workdir": folders[run]})
  exports = [os.path.join(folders[run], "export") for run in runs]
  results = analyze.run(analysis_config(config, exports), os.path.join(workdir, "analysis"))
  summary = summarise(results, {w: [member_name(w, i) for i in range(count)]
                                for w in lambdas})
  summary["analysis"] = os.path.join(workdir, "analysis", "results.json")
  write_json_atomic(os.path.join(workdir, "sweep.json"), summary)
  save_figure_atomic(figure(summary), os.path.join(workdir, "sweep.png"))
  return summary
