"""A worked example of an objective (README, "Architecture"): a denoising autoencoder.

The encoder sees each image with Gaussian noise added (standard deviation
`config.denoise.noise_std`, in normalised units) and a linear pixel head on its patch tokens
predicts the clean patches; the loss is their mean squared error. The module is all an objective
needs besides a config section: register it with
`clmim.train.objectives.OBJECTIVES["denoise"] = "denoise_objective"` (tests/test_objectives.py
does, then trains, resumes and exports it).
"""
import jax
import jax.numpy as jnp

from clmim.errors import ClmimError
from clmim.models.heads import PixelHead, patchify
from clmim.train.common import SingleEncoderObjective, build_encoder, normalise


class Objective(SingleEncoderObjective):
  """Denoising; `config.denoise.noise_std` is its one field."""

  SECTIONS = ("denoise",)  # a run resumes only with the same noise

  @classmethod
  def check_config(cls, config) -> None:
    std = config.denoise.noise_std
    if isinstance(std, bool) or not isinstance(std, (int, float)) or std < 0:
      raise ClmimError(f"config.denoise.noise_std={std!r}: expected a number >= 0.")

  def __init__(self, config):
    super().__init__(config)
    self.encoder = build_encoder(config)
    self.head = PixelHead(self.encoder.patch_size)

  def init(self, rng, images):
    k_encoder, k_head = jax.random.split(rng)
    encoder = self.encoder.init(k_encoder, images)["params"]
    tokens = self.encoder.apply({"params": encoder}, images)
    patches = tokens[:, self.encoder.num_prefix_tokens:]
    return {"encoder": encoder, "head": self.head.init(k_head, patches)["params"]}, {}

  def loss(self, params, state, images, rng, step):
    clean = normalise(images, self.config.data)
    noisy = clean + self.config.denoise.noise_std * jax.random.normal(rng, clean.shape)
    tokens = self.encoder.apply({"params": params["encoder"]}, noisy)
    prediction = self.head.apply({"params": params["head"]},
                                 tokens[:, self.encoder.num_prefix_tokens:])
    loss = jnp.mean((prediction - patchify(clean, self.encoder.patch_size)) ** 2)
    return loss, (state, {"loss": loss})
