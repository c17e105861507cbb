"""Token norms per layer: high-norm outlier tokens, registers and where attention goes.

Large ViTs trained long (DINOv2, CLIP, DeiT-III; Darcet et al., "Vision Transformers Need
Registers", 2024) grow a few patch tokens whose residual-state norm is many times that of the
others, in uninformative background patches, from the middle layers on; attention concentrates
on them. Register tokens give the model a place for that computation instead. This analysis
measures both, per residual state, on any token layout (cls or not, registers or not).

Definitions (docs/analyses/token_norms.md). For each image and each stage s (the embedding
output, then each block's output: zs[0], zs[2], ..., zs[2L]) with patch-token norms
n_k = ||z_k||_2 (k over the N patch tokens) and their median m over the image's patches:
- token_norm_patches [stage]: mean_k n_k; token_norm_cls [stage]: ||z_cls|| (None without a cls
  token); token_norm_registers [stage]: the registers' mean norm (None without registers);
- high_norm_fraction [stage]: the fraction of patch tokens with n_k > ratio · m (option
  `ratio`, default 4: a token four times as long as the image's typical patch token);
- high_norm_peak [stage]: max_k n_k / m, the longest patch token relative to the median.
For each block l, with its attention maps A [heads, T, T] (patch queries q only; each row sums
to 1 over all T keys):
- attention_to_cls [block][head]: mean_q A[q, cls] (None without a cls token);
- attention_to_registers [block][head]: mean_q Σ_r A[q, r] (None without registers);
- attention_to_high_norm [block][head]: mean_q Σ_k A[q, k] over the patch keys k that are
  high-norm in the block's input state zs[2l] (the attention-sink finding).
Every value is a mean over images (each image weighs the same).
"""
import jax.numpy as jnp
import numpy as np

from clmim.analysis import core
from clmim.analysis.common import weighted_sum
from clmim.errors import ClmimError

NAME = "token_norms"
OPTIONS = {"ratio": 4.0}


def per_stage_values(values) -> list:
  """[per stage] -> the same floats (stage 0 = embedding)."""
  return np.asarray(values, np.float64).reshape(-1).tolist()


_STAGE = dict(x="stage", series=per_stage_values)
RESULTS = (
    core.Result("token_norm_patches", "mean patch-token norm", "[stage]", **_STAGE,
                description="mean L2 norm of the patch tokens of each block's output"),
    core.Result("token_norm_cls", "cls-token norm", "[stage]", **_STAGE,
                description="L2 norm of the cls token (None for a model without one)"),
    core.Result("token_norm_registers", "register-token norm", "[stage]", **_STAGE,
                description="mean L2 norm of the register tokens (None without registers)"),
    core.Result("high_norm_fraction", "fraction of high-norm patch tokens", "[stage]", **_STAGE,
                title="High-norm patch tokens",
                description="share of patch tokens longer than `ratio` x the image's median"),
    core.Result("high_norm_peak", "longest / median patch-token norm", "[stage]", **_STAGE,
                description="the longest patch token relative to the image's median one"),
    core.Result("attention_to_cls", "attention on cls", "[block][head]",
                description="attention mass of patch queries on the cls token"),
    core.Result("attention_to_registers", "attention on registers", "[block][head]",
                description="attention mass of patch queries on the register tokens"),
    core.Result("attention_to_high_norm", "attention on high-norm patches", "[block][head]",
                description="attention mass of patch queries on the block input's high-norm "
                            "patch tokens"),
)


def _ratio(options: dict) -> float:
  value = options.get("ratio", 4.0)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 1:
    raise ClmimError(f"config.analysis_options.token_norms.ratio: expected a number > 1, got "
                     f"{value!r}.")
  return float(value)


def check(model, options: dict) -> None:
  """Validates the options before any compute."""
  del model
  _ratio(options)


def _high_norm(z, layout, ratio):
  """(patch norms [b, N], their per-image median [b], high-norm mask [b, N]) of states z."""
  norms = jnp.linalg.norm(layout.patches(z).astype(jnp.float32), axis=-1)
  median = jnp.median(norms, axis=-1)
  return norms, median, norms > ratio * median[:, None]


def partial_sums(batch: core.Batch, options: dict) -> dict:
  """Per-stage norm sums and per-block attention-mass sums over the batch's images."""
  layout, weights, ratio = batch.layout, batch.weights, _ratio(options)
  stages = list(batch.zs[0::2])
  out = {}
  rows = {"patches": [], "fraction": [], "peak": [], "cls": [], "registers": []}
  for z in stages:
    norms, median, high = _high_norm(z, layout, ratio)
    rows["patches"].append(weighted_sum(norms.mean(-1), weights))
    rows["fraction"].append(weighted_sum(high.astype(jnp.float32).mean(-1), weights))
    rows["peak"].append(weighted_sum(norms.max(-1) / jnp.maximum(median, 1e-30), weights))
    if layout.has_cls:
      rows["cls"].append(weighted_sum(jnp.linalg.norm(layout.cls(z), axis=-1), weights))
    if layout.num_registers:
      first = int(layout.has_cls)
      registers = jnp.linalg.norm(z[:, first:layout.prefix].astype(jnp.float32), axis=-1)
      rows["registers"].append(weighted_sum(registers.mean(-1), weights))
  for name, values in rows.items():
    if values:
      out[f"norm_{name}"] = jnp.stack(values)
  to_cls, to_registers, to_high = [], [], []
  for block, attn in enumerate(batch.attns):
    queries = attn[:, :, layout.prefix:].astype(jnp.float32)  # [b, H, N, T]
    if layout.has_cls:
      to_cls.append(weighted_sum(queries[..., 0].mean(-1), weights))
    if layout.num_registers:
      mass = queries[..., int(layout.has_cls):layout.prefix].sum(-1)
      to_registers.append(weighted_sum(mass.mean(-1), weights))
    _, _, high = _high_norm(batch.zs[2 * block], layout, ratio)
    mass = jnp.sum(queries[..., layout.prefix:] * high[:, None, None, :], axis=-1)
    to_high.append(weighted_sum(mass.mean(-1), weights))
  for name, values in (("cls", to_cls), ("registers", to_registers), ("high_norm", to_high)):
    if values:
      out[f"attention_{name}"] = jnp.stack(values)
  return out


def finalize(sums: dict, options: dict) -> dict:
  """Means over images; None for token kinds the model does not have."""
  del options
  count = float(sums["count"])

  def mean(key):
    return (np.asarray(sums[key], np.float64) / count).tolist() if key in sums else None

  return {"token_norm_patches": mean("norm_patches"), "token_norm_cls": mean("norm_cls"),
          "token_norm_registers": mean("norm_registers"),
          "high_norm_fraction": mean("norm_fraction"), "high_norm_peak": mean("norm_peak"),
          "attention_to_cls": mean("attention_cls"),
          "attention_to_registers": mean("attention_registers"),
          "attention_to_high_norm": mean("attention_high_norm")}
