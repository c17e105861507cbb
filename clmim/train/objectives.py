"""The objective interface (what the trainer asks of an objective) and the table of objectives.

An objective is a class `Objective` in its own module of clmim/train/ that subclasses
`objectives.Objective` and overrides what it needs; `OBJECTIVES` maps the value of
`config.objective` to that module. The trainer (`clmim.train.trainer`, `clmim.jobs.pretrain`)
owns everything else: the optimizer, the sharded step, the input stream, checkpoints, logs and
the export.

Adding an objective is one module here, one row of `OBJECTIVES`, a config in configs/ and a test
(README, "Architecture").
"""
from __future__ import annotations

import abc
import importlib
from typing import Optional

from clmim.errors import ClmimError
from clmim.suggestions import did_you_mean

# config.objective -> the module that defines its Objective (imported only when used).
OBJECTIVES = {
    "moco_v3": "clmim.train.moco_v3",   # MoCo v3: two views, InfoNCE, a momentum encoder
    "simmim": "clmim.train.simmim",     # SimMIM: block masks, L1 on masked pixels
    "mae": "clmim.train.mae",           # MAE: drop masked tokens, decoder, MSE
    "hybrid": "clmim.train.hybrid",     # (1 - λ) SimMIM + λ MoCo v3 on one backbone
    "finetune": "clmim.train.finetune",  # supervised fine-tuning with a classifier head
}
NAMES = tuple(OBJECTIVES)


class Objective(abc.ABC):
  """What the trainer asks of an objective. Subclass it, set the class fields and override the
  methods whose default does not fit; `init`, `loss`, `encoder_params` and `with_encoder` have
  none (a class that lacks one cannot be instantiated).

  Class fields:
    SECTIONS: the config sections the objective reads (e.g. ("moco",)). A saved run resumes only
      when they are unchanged (with the trainer's own: model, data, seed, ...).
    HOW_NOT_WHAT: dotted fields inside SECTIONS that say how a run is carried out, not what it
      computes (e.g. "finetune.eval_every"): a run may be resumed with other values.
    ADDED_LATER: {dotted field: value} of fields added after runs were recorded without them,
      with the value that reproduces what those runs did.
    LAYERWISE_LR: whether `lr_scale` scales each parameter's update (fine-tuning's decay).
    MODE: the mode of `clmim.main` that trains it: "pretrain", or "finetune" for a supervised
      objective that starts from a pretrained encoder (both run `clmim.jobs.pretrain`).

  Attributes set by __init__:
    encoder: the ViT (flax module) whose weights an export keeps.
    label_key: None, or the batch column a supervised objective receives as inputs["label"].
    pretrained: the resolved config.init_encoder when the objective had to resolve it for its
      architecture (the trainer then reuses it), else None.
  """

  SECTIONS: tuple = ()
  HOW_NOT_WHAT: tuple = ()
  ADDED_LATER: dict = {}
  LAYERWISE_LR = False
  MODE = "pretrain"
  label_key: Optional[str] = None
  pretrained = None

  def __init__(self, config):
    self.config = config

  @classmethod
  def check_config(cls, config) -> None:
    """One error line for a field of SECTIONS that cannot work, before any model is built.
    (Checks that need the model run in __init__.)"""
    del config

  @abc.abstractmethod
  def init(self, rng, images):
    """(params, state) for `images` [B, S, S, 3]; state holds what is not trained (EMAs)."""

  @abc.abstractmethod
  def loss(self, params, state, inputs, rng, step):
    """(loss, (state, metrics)) for one global batch: `inputs` is the image batch
    [B, S, S, 3] ([B, 2, S, S, 3] with a second view; {"image", "label"} with a label_key),
    `rng` the step's key, `step` the step number. Differentiated with respect to params."""

  @abc.abstractmethod
  def encoder_params(self, params, state):
    """The encoder's params (what an export keeps)."""

  @abc.abstractmethod
  def with_encoder(self, params, state, encoder):
    """(params, state) with `encoder` as the encoder's weights (config.init_encoder)."""

  def frozen(self, path: str) -> bool:
    """Whether the parameter at "/"-joined `path` is never updated."""
    del path
    return False

  def after_update(self, params, state, step):
    """The state after an optimizer step (MoCo's momentum encoder); default: unchanged."""
    del params, step
    return state

  def lr_scale(self, path: str) -> float:
    """The factor on the update of the parameter at `path` (used when LAYERWISE_LR)."""
    del path
    return 1.0

  def evaluator(self, batch_sharding, replicated, rows):
    """A callable (params, state) -> {metric: value} with an attribute `every` (steps between
    calls, a multiple of config.log_every; 0: only at the end), run at those steps and at the
    end; or None."""
    del batch_sharding, replicated, rows
    return None

  def pretraining_decoder(self, params):
    """The decoder an export keeps beside the encoder, {"kind", "params", "config"}
    (`clmim.models.heads.decoder_module`), or None."""
    del params
    return None


def get(name: str, where: str = "config.objective") -> type:
  """The Objective class of objective `name`; one error naming the field and the objectives."""
  if name not in OBJECTIVES:
    raise ClmimError(f"{where}={name!r}{did_you_mean(str(name), NAMES)}: expected one of "
                     f"{', '.join(NAMES)}.")
  cls = getattr(importlib.import_module(OBJECTIVES[name]), "Objective", None)
  if not (isinstance(cls, type) and issubclass(cls, Objective)):
    raise ClmimError(f"{OBJECTIVES[name]} defines no Objective subclassing "
                     f"clmim.train.objectives.Objective.")
  return cls


def load(config) -> Objective:
  """The Objective of config.objective, built for `config`."""
  return get(config.objective)(config)
