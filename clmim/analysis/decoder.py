"""Through the pretraining decoder: is MAE's explicit decoder low-pass while its encoder is not?

The paper (Park et al., ICLR 2023, the MAE discussion) finds that MAE's decoder, not its
encoder, does the low-pass work that reconstruction needs: the encoder keeps high-frequency
content, the decoder's blocks lose it. This analysis runs the decoder on the encoder's output
and applies the repository's own definitions to its states (docs/analyses/decoder.md):

  decoder_fourier[stage][frequency]  `fourier`'s ΔlogA (same function, same read-out) of the
      decoder's stages: MAE: the blocks' input (embed(latent) + pos_embed), then each decoder
      block's output; SimMIM: one stage, the 1x1-conv head's per-token output (p*p*3 channels).
  decoder_nmi[block][head]  `nmi`'s NMI of each decoder block's attention (empty for SimMIM,
      whose decoder has no attention).
  encoder_decoder_fourier[stage]  ΔlogA at the highest frequency of the encoder's stages
      (`fourier`'s curve) followed by the decoder's: the paper's figure as one curve.

What the decoder sees (option `input`):
  "masked" (default): what it saw in pretraining. Each image gets its own random mask (drawn
      from `mask_seed` and the image's stream position: the same masks for any batching and
      device count). MAE: the encoder runs on the kept int(N·(1 − ratio)) patches only and the
      decoder gets them at their grid positions with its mask token elsewhere; SimMIM: the
      encoder runs with masked blocks replaced by its mask token, the pixel head on its output.
      The ratio (and SimMIM's block side) are the checkpoint's: its manifest's for clmim's
      exports, the official recipes' for official files (MAE 0.75; SimMIM 0.6 in 32 px blocks).
  "unmasked": every token of the unmasked image's encoding, which MAE's decoder never saw in
      training (the earlier default; masks then play no part).
The encoder's own states (every other analysis, and the encoder part of
encoder_decoder_fourier) are always the unmasked image's.

Options:
  input: "masked" (default) or "unmasked".
  mask_ratio: 0.0 = the checkpoint's training ratio; else the share of patches masked, (0, 1).
  mask_patch: 0 = the checkpoint's SimMIM block side in pixels; else a multiple of the patch
    size that tiles the image (SimMIM only).
  mask_seed: 0: the seed every image's mask is drawn from.

Models need a decoder: load with `?decoder=1` an export of clmim's own MAE, SimMIM or hybrid
pretraining (`runs/<run>/export?decoder=1`: exports keep the decoder beside the encoder), or
an official MAE _full/visualize or SimMIM checkpoint (`check` refuses any other model before
compute). Decoders are built for the paper's token layout only (cls at index 0, then the
patches, no registers): the decoder's states always have that layout, and `check` refuses a
model with a decoder whose encoder has registers or no cls token. As in `fourier` and `nmi`,
only the patch tokens are read (attention rows renormalised over the patch keys).
"""
import dataclasses

import jax.numpy as jnp
import numpy as np

from clmim.analysis import core, fourier, nmi
from clmim.analysis.common import weighted_sum
from clmim.errors import ClmimError

NAME = "decoder"
OPTIONS = {"input": "masked", "mask_ratio": 0.0, "mask_patch": 0, "mask_seed": 0}
INPUTS = ("masked", "unmasked")

# Exactly fourier's curve: the last (highest) frequency of each stage.
_HIGHEST = core.results_of(fourier)["fourier"].series


def _nmi_series(values):
  """Per-block mean over heads; [] for a decoder without attention (SimMIM)."""
  return core.per_block_mean_over_heads(values) if len(values) else []


RESULTS = (
    core.Result(key="decoder_fourier", label="high-frequency ΔlogA (decoder)",
                layout="[stage][frequency]", x="stage", series=_HIGHEST,
                title="Decoder: high-frequency ΔlogA",
                description="fourier's ΔlogA through the pretraining decoder (stage 0 = its "
                            "embedded input; SimMIM: the single stage is its pixel head's "
                            "output); falling = the decoder is low-pass"),
    core.Result(key="decoder_nmi", label="NMI (decoder)", layout="[block][head]",
                series=_nmi_series, reference=0.0,
                reference_label="query-independent attention",
                title="Decoder: normalised mutual information (query, key)",
                description="nmi's NMI of each decoder block's attention (empty for SimMIM, "
                            "whose decoder has no attention)"),
    core.Result(key="encoder_decoder_fourier", label="high-frequency ΔlogA",
                layout="[stage]", x=None, series=None,
                title="High-frequency ΔlogA through encoder and decoder",
                description="ΔlogA at the highest frequency of the encoder's stages followed by "
                            "the decoder's (decoder.png; the dotted line marks the decoder)"),
)


def _where(field: str) -> str:
  return f"config.analysis_options.{NAME}.{field}"


def feed(model, options: dict) -> dict | None:
  """The masked feed {"ratio", "patch" (SimMIM block side in tokens, else 0), "seed"} of
  `model`'s decoder under `options`, or None for input="unmasked". Raises ClmimError (one line,
  naming the option) when it cannot be built; `check` calls it before any compute."""
  if options["input"] not in INPUTS:
    raise ClmimError(f"{_where('input')}={options['input']!r}: expected one of "
                     f"{', '.join(INPUTS)}.")
  if options["input"] == "unmasked":
    return None
  decoder, vit = model.decoder, model.vit
  trained = decoder.get("training_mask") or {}
  ratio = float(options["mask_ratio"] or trained.get("ratio") or 0)
  if not 0 < ratio < 1:
    raise ClmimError(f"{_where('mask_ratio')}={options['mask_ratio']!r}: expected a share in "
                     f"(0, 1), or 0 for the checkpoint's, which model {model.name!r} does not "
                     f"record; give one, or input='unmasked'.")
  seed = options["mask_seed"]
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ClmimError(f"{_where('mask_seed')}={seed!r}: expected an integer.")
  tokens = vit.grid ** 2
  if decoder["kind"] == "mae":
    if int(tokens * (1 - ratio)) < 1:
      raise ClmimError(f"{_where('mask_ratio')}={ratio}: keeps no patch of {tokens}.")
    return {"ratio": ratio, "patch": 0, "seed": seed}
  pixels = int(options["mask_patch"] or trained.get("patch_px") or 0)
  if pixels % vit.patch_size or not pixels or vit.grid % (pixels // vit.patch_size):
    raise ClmimError(f"{_where('mask_patch')}={options['mask_patch']!r} (block side {pixels} px "
                     f"for model {model.name!r}): expected a multiple of the patch size "
                     f"{vit.patch_size} that tiles the {vit.image_size} px image; 0 takes the "
                     "checkpoint's.")
  if "mask_token" not in decoder:
    raise ClmimError(f"model {model.name!r}: input='masked' needs SimMIM's encoder mask token, "
                     f"which this checkpoint does not hold; use {_where('input')}='unmasked'.")
  return {"ratio": ratio, "patch": pixels // vit.patch_size, "seed": seed}


def check(model, options: dict) -> None:
  """Refuses a model without a decoder, one whose encoder is not laid out as the paper's
  (registers, or no cls token), or a feed it cannot have, before any compute."""
  name = getattr(model, "name", "?")
  if getattr(model, "decoder", None) is None:
    raise ClmimError(f"model {name!r} has no decoder: load an MAE / SimMIM export of clmim "
                     f"('runs/<run>/export?decoder=1') or an official MAE _full/visualize or "
                     f"SimMIM checkpoint with '?decoder=1'.")
  layout = core.TokenLayout.of(model.vit)
  if layout != core.TokenLayout():
    raise ClmimError(f"model {name!r}: the decoder analysis needs the paper's token layout (a "
                     f"cls token, no registers); its encoder has "
                     f"{'a' if layout.has_cls else 'no'} cls token and {layout.num_registers} "
                     f"register tokens, and pretraining decoders are only built for cls-first "
                     f"models.")
  feed(model, options)


def partial_sums(batch: core.Batch, options: dict):
  """Weighted sums of fourier's spectra of the encoder's and the decoder's states, and of the
  decoder blocks' per-image NMI.

  Returns:
    {"encoder_fourier": fourier's sums of batch.zs, "decoder_fourier": fourier's sums of
     batch.decoder_zs, "nmi_sum": [decoder blocks, heads] (absent without decoder attention),
     }.
  """
  del options
  if not batch.decoder_zs:
    raise ClmimError("decoder: the forward gave no decoder states; load the model with "
                     "'?decoder=1' (an MAE / SimMIM export of clmim, or an official MAE "
                     "_full/visualize or SimMIM checkpoint).")
  # fourier's own sums (its DC-relative accumulation included), so the definition is shared.
  # The encoder's states are laid out as batch.layout says; the decoder's always as the paper's
  # (cls, then the patches: decoders are only built for such encoders, see `check`).
  paper = core.TokenLayout()
  sums = {"encoder_fourier": core.sums_of(fourier, batch, {}),
          "decoder_fourier": core.sums_of(
              fourier, dataclasses.replace(batch, zs=tuple(batch.decoder_zs), layout=paper), {})}
  if batch.decoder_attns:
    sums["nmi_sum"] = jnp.stack([weighted_sum(nmi.per_image(a, paper)[0], batch.weights)
                                 for a in batch.decoder_attns])
  return sums


def finalize(total_sums, options):
  """{"decoder_fourier": [[freq] stage], "decoder_nmi": [[head] block] or [],
  "encoder_decoder_fourier": [stage]}."""
  del options
  count = float(total_sums["count"])
  if count <= 0:
    raise ClmimError("decoder: no images were analysed (total weight is 0).")
  encoder = fourier.finalize(total_sums["encoder_fourier"], {})["fourier"]
  decoder = fourier.finalize(total_sums["decoder_fourier"], {})["fourier"]
  decoder_nmi = (np.asarray(total_sums["nmi_sum"], np.float64) / count).tolist() \
      if "nmi_sum" in total_sums else []
  return {"decoder_fourier": decoder, "decoder_nmi": decoder_nmi,
          "encoder_decoder_fourier": list(_HIGHEST(encoder)) + list(_HIGHEST(decoder))}


def figures(results: dict, options: dict) -> dict:
  """decoder.png: ΔlogA at the highest frequency vs depth through the encoder then the decoder,
  one line per model, a dotted vertical line where each model's decoder starts; the per-Result
  depth curves (decoder_fourier.png, decoder_nmi.png) are drawn by the shared figure code."""
  from matplotlib.figure import Figure  # matplotlib only when figures are drawn
  from matplotlib.ticker import MaxNLocator
  from clmim.analysis import plots
  del options
  models = results.get("models", {})
  names = [n for n, r in models.items() if r.get("encoder_decoder_fourier")]
  if not names:
    return {}
  styles = plots.model_styles(results, names)
  fig = Figure(figsize=(6.2, 3.8))
  ax = fig.add_subplot()
  starts = {}
  for name in names:
    curve = np.asarray(models[name]["encoder_decoder_fourier"], np.float64)
    # The decoder's stages are the last len(decoder_fourier) entries.
    start = len(curve) - len(models[name]["decoder_fourier"])
    starts.setdefault(start, []).append(name)
    style = styles[name]
    ax.plot(np.arange(len(curve)), curve, marker="o", markersize=3.5, linewidth=1.8,
            color=style["color"], linestyle=style["linestyle"], label=style["label"])
  for start, owners in sorted(starts.items()):
    # One shared boundary in black; per-model colours only when the encoders' depths differ.
    color = "k" if len(starts) == 1 else styles[owners[0]]["color"]
    ax.axvline(start - 0.5, color=color, linestyle=":", linewidth=1.2,
               label="decoder starts" if start == min(starts) else None)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_xlabel("Stage (encoder: 0 = embedding; then the decoder)", fontsize=11)
  ax.set_ylabel("ΔLog amplitude (highest frequency)", fontsize=11)
  ax.set_title("High-frequency amplitude through encoder and decoder", fontsize=12)
  ax.grid(alpha=0.25, linewidth=0.6)
  ax.spines[["top", "right"]].set_visible(False)
  plots.add_legend(ax, fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  return {"decoder.png": fig}
