"""Building blocks shared by the files in configs/ (configs are code; README.md, "Configs").

Every pretraining config has the fields below; each is documented where it is set.
"""
from __future__ import annotations

import os

import ml_collections
from ml_collections.config_dict import placeholder

from clmim.analysis import core


# Where compiled XLA programs are kept between runs (JAX's persistent compilation cache). The
# environment variable CLMIM_COMPILATION_CACHE replaces the default: the tests and
# benchmarks/command_times.py point it at a fresh folder, so they neither read nor fill the
# user's cache.
DEFAULT_COMPILATION_CACHE = "~/.cache/clmim/jax"
COMPILATION_CACHE = os.environ.get("CLMIM_COMPILATION_CACHE", DEFAULT_COMPILATION_CACHE)


def demo_model(**fields) -> ml_collections.ConfigDict:
  """The demo ViT: variant mu/4 (width 128, depth 6, 4 heads, MLP 256, patch 4); at 32 px
  (config.data.image_size) that is an 8x8 token grid."""
  model = dict(
      variant="mu/4",               # "<size>/<patch>": mu, Ti, S, M, B, L, H (e.g. "B/16") sets
                                    #   width, depth, num_heads, mlp_dim and patch_size
      # Set any of these to override the variant's value (None = the variant's). Each needs its
      # own placeholder: one shared FieldReference would tie the fields together.
      width=placeholder(int), depth=placeholder(int), num_heads=placeholder(int),
      mlp_dim=placeholder(int), patch_size=placeholder(int),
      block_style="timm",           # "timm" (fused qkv bias) or "beit" (q/v bias, layer scale)
      position_embedding="learned", # "learned", "sincos" (fixed) or "none"
      rel_pos_bias="none",          # "none", "shared" or "per_block"
      layer_scale_init=placeholder(float),  # layer scale's initial value; None = no layer scale
      use_mask_token=False,         # SimMIM/BEiT mask token
      drop_path=0.0,                # stochastic depth rate of the last block (online encoder)
  )
  model.update(fields)
  return ml_collections.ConfigDict(model)


# Parameters that get no weight decay, by their last path component: biases, norms, tokens,
# position tables, relative-position tables and layer scales (as MAE, BEiT and timm exclude them).
NO_WEIGHT_DECAY = r"/(bias|scale|cls_token|mask_token|pos_embed|table|gamma_1|gamma_2|q_bias|v_bias)$"


def pretrain_base(arg: str, name: str, objective: str, family: str,
                  variants: tuple = ("demo", "runlocal")) -> ml_collections.ConfigDict:
  """Fields every pretraining run has, at the demo scale. `variants`: the config file's own."""
  if arg not in variants:
    raise ValueError(f"Unknown config variant {arg!r}; expected one of {variants}.")
  config = ml_collections.ConfigDict()
  config.mode = "pretrain"          # what clmim.main does with this config
  config.name = name                # name of the exported checkpoint
  config.objective = objective      # module clmim/train/<objective>.py
  config.family = family            # "cl" or "mim": how figures colour the model
  config.seed = 0                   # parameter init and augmentation randomness
  config.init_encoder = ""          # model spec (an export path or a shipped name) whose encoder
                                    #   weights start a fresh run ("" = random init); heads start
                                    #   new; its architecture must be config.model's
  config.total_steps = 6000         # optimisation steps (cosine schedules end here)
  config.batch_size = 64            # global batch, split over all devices
  config.lr = 1e-3                  # peak learning rate
  config.warmup_steps = 300         # linear warm-up steps
  config.final_lr_fraction = 0.01   # lr at the end of the cosine, as a fraction of the peak
  config.weight_decay = 0.05        # AdamW decoupled weight decay (matrices only)
  config.no_weight_decay = NO_WEIGHT_DECAY  # regex (re.search) over parameter paths, e.g.
                                    #   "/online/encoder/block_0/attn/qkv/bias": matches get no
                                    #   weight decay (vectors never do); "" = only vectors
  config.freeze = ""                # regex over parameter paths: matches are not updated, on
                                    #   top of the objective's own (MoCo v3's patch embedding,
                                    #   a fixed sin-cos table); "" = none
  config.beta2 = 0.95               # AdamW second-moment decay
  config.grad_clip = 3.0            # global-norm gradient clipping (0 = off)
  config.log_every = 25             # steps between metrics.jsonl records
  config.tensorboard = True         # also write them as TensorBoard scalars to
                                    #   workdir/tensorboard/ (tensorboardX)
  config.checkpoint_every = 250     # steps between orbax checkpoints (and resumable points)
  config.keep_checkpoints = 30      # orbax checkpoints kept (snapshots for metrics over training)
  config.snapshot_images = 256      # held-out images per checkpoint for --config.mode=snapshots
  config.snapshot_analyses = "attention_distance,nmi,fourier"  # analyses of --config.mode=snapshots
  config.compilation_cache = COMPILATION_CACHE  # folder of JAX's persistent compilation cache:
                                    #   a later run reuses the compiled steps ("" = off)
  config.data = ml_collections.ConfigDict(dict(
      # What trains (clmim/data/train_data.py): "synthetic" = procedural shapes x textures
      # (clmim/data/synthetic.py), "image_folder" = data.path, "tfds" = data.tfds_name; each
      # process loads only its devices' rows of every step's batch.
      source="synthetic",
      path="",                      # image_folder: root with one sub-folder of images per class
      tfds_name="",                 # tfds: dataset name, e.g. "imagenet2012" (array_record)
      tfds_split="train",           # tfds: the split that trains
      data_dir="",                  # tfds: folder of prepared datasets ("" = TFDS's default)
      read_threads=8,               # image_folder / tfds: grain decoding threads (results do
                                    #   not depend on it)
      image_size=32,                # pixels, for the data and the model alike
      num_train_images=50000,       # size of the procedural training split (then it repeats)
      seed=0,                       # dataset seed (procedural images; real data's shuffle)
      version=3,                    # generator version (clmim/data/synthetic.py VERSIONS):
                                    #   1 exact shapes, 2 per-instance outlines, 3 outlines
                                    #   and a dark + a light texture colour (the demo models')
      mean="half", std="half",      # normalisation: "imagenet", "half" or 3-tuples
      render_workers=1,             # rendering ahead of training: 1 = one background thread,
                                    #   n > 1 = n processes (on a GPU/TPU host, its CPU count)
  ))
  return config


IMAGENET_TRAIN_IMAGES = 1281167  # ImageNet-1k's training split: one epoch


def imagenet_recipe(config, batch_size: int, epochs: float, warmup_epochs: float,
                    base_lr: float, lr_batch: int) -> None:
  """Sets a `vitb16` variant's data and schedule: TFDS imagenet2012 (prepared as array_record)
  at 224 px with ImageNet normalisation, `batch_size`, lr = base_lr x batch_size / lr_batch (the
  official linear scaling rule), and epochs / warm-up epochs converted to steps (rounded up)."""
  config.data.source = "tfds"
  config.data.tfds_name = "imagenet2012"
  config.data.image_size = 224
  config.data.mean = config.data.std = "imagenet"
  config.batch_size = batch_size
  config.lr = base_lr * batch_size / lr_batch
  config.total_steps = -(-int(epochs * IMAGENET_TRAIN_IMAGES) // batch_size)
  config.warmup_steps = -(-int(warmup_epochs * IMAGENET_TRAIN_IMAGES) // batch_size)
  config.log_every = 100
  config.checkpoint_every = 2000
  config.keep_checkpoints = 10


def finish(config: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
  """Applies the `runlocal` shrink (seconds on a laptop) and locks the config."""
  if arg == "runlocal":
    config.total_steps = 6
    config.warmup_steps = 2
    config.batch_size = 16
    config.log_every = 2
    config.checkpoint_every = 3
    config.data.num_train_images = 256
    config.model.depth = 2
  config.lock()
  return config


def analysis_base(arg: str, name: str, analyses: str,
                  num_images: int = 512) -> ml_collections.ConfigDict:
  """Fields every analysis run has. `arg`: "" / "demo" (the embedded default: the two demo
  models on `num_images` held-out procedural images) or "runlocal" (fewer images, for a quick
  check)."""
  if arg not in ("", "demo", "runlocal"):
    raise ValueError(f"Unknown config variant {arg!r}; expected 'demo' or 'runlocal'.")
  config = ml_collections.ConfigDict()
  config.mode = "analyze"           # what clmim.main does with this config
  config.name = name                # default workdir prefix
  config.analyses = analyses        # comma-separated names of clmim/analysis/ modules (README)
  # Per-analysis options, config.analysis_options.<analysis>.<option>: every analysis' OPTIONS
  # with their defaults (documented in its module docstring), whether it runs or not.
  config.analysis_options = {name: dict(core.load(name).OPTIONS) for name in core.available()}
  # Comma-separated model specs: known names (clmim/demo_checkpoints/*), checkpoint paths, or
  # random:<spec> for an untrained copy of an architecture.
  config.models = "moco_v3_demo,simmim_demo"
  config.overwrite = False          # a workdir holding an earlier analysis run: replace its
                                    #   outputs (True) or stop with an error (False)
  config.include_untrained = True   # also analyse a randomly initialised copy of each model
  config.seed = 0                   # init seed of the untrained copies
  config.batch_size = 64            # images per step over all devices (batch_size // devices each)
  config.dtype = "float32"          # the models' forward: "float32" or "bfloat16" (matmuls in
                                    #   bf16; softmax, LayerNorm statistics and every metric sum
                                    #   in float32; accuracy: docs/performance.md)
  config.progress = True            # progress bars
  config.compilation_cache = COMPILATION_CACHE  # see pretrain_base
  # Bootstrap 95 % intervals over images for every curve and finding (clmim/analysis/
  # bootstrap.py; the verdict rule: docs/definitions.md "Verdicts").
  config.intervals = ml_collections.ConfigDict(dict(
      folds=32,                     # image i is in fold i mod folds; replicates resample folds
                                    #   (0 = no intervals: every verdict is "inconclusive")
      replicates=1000,              # bootstrap replicates (>= 20)
      seed=0,                       # seed of the fold draws (the same draws for every model)
  ))
  config.data = evaluation_data(num_images=num_images)
  config.probe_data = probe_data()
  if arg == "runlocal":
    config.data.num_images = 64
    config.probe_data.num_images = 256
    config.include_untrained = False
    config.intervals.replicates = 200  # a quick look: percentiles of 200 draws, not 1000
  config.lock()
  return config


def evaluation_data(**fields) -> ml_collections.ConfigDict:
  """The `config.data` section of an analysis run: the images every model is analysed on.
  Every analysis config, the snapshots and the sweep build it here; `fields` replace defaults
  (an unknown one is an error)."""
  data = ml_collections.ConfigDict(dict(
      source="synthetic",           # "synthetic" (no download), "image_folder" or "tfds"
      split="validation",           # synthetic: validation (held out), train, cue_conflict;
                                    #   tfds: any TFDS split, e.g. "validation", "train[:10%]"
      num_images=512,               # images per model, the first ones in dataset order after
                                    #   per-class subsampling (0 = all of them)
      max_batches=0,                # cap: at most this many steps of batch_size images per
                                    #   model and pass (probes: per image set; 0 = no cap)
      seed=0,                       # synthetic dataset seed
      version=3,                    # synthetic generator version (clmim/data/synthetic.py
                                    #   VERSIONS): 1 exact shapes (the version 1 demo models'
                                    #   data), 2 per-instance outlines, 3 outlines and a dark +
                                    #   a light texture colour (the demo models' data)
      path="",                      # image_folder: root with one sub-folder per class
      tfds_name="",                 # tfds: dataset name, e.g. "imagenet2012", "imagenette",
                                    #   "imagenette/320px-v2" (prepared as array_record; no
                                    #   TensorFlow needed to read)
      data_dir="",                  # tfds: TFDS data folder ("" = $TFDS_DATA_DIR or
                                    #   ~/tensorflow_datasets)
      max_images_per_class=0,       # image_folder/tfds: the first N of each class (0 = all)
      fraction_per_class=0.0,       # image_folder/tfds: the first int(f * class size) of each
                                    #   class, as the official notebooks subsample (0 = all)
      num_workers=0,                # decode/preprocess threads (0 = min(8, CPU cores))
      crop_pct=0.0,                 # image_folder/tfds: shorter side -> image_size / crop_pct,
                                    #   then centre crop; 0 = the model's own (0.875 if unknown)
      interpolation="",             # "bilinear" / "bicubic"; "" = the model's own
      mean="", std="",              # "imagenet", "half" or 3 numbers; "" = the model's own
  ))
  return _checked_update(data, fields, "evaluation_data")


def probe_data(**fields) -> ml_collections.ConfigDict:
  """The `config.probe_data` section: the probes' other image sets (read by the probing and
  robustness analyses only; the evaluation images are config.data's stream)."""
  data = ml_collections.ConfigDict(dict(
      split="train",                # synthetic/tfds: the split the probes are fitted on
      path="",                      # image_folder: folder of labelled training images (one
                                    #   sub-folder per class, the classes of config.data.path)
      num_images=4000,              # probe training images, the first in dataset order after
                                    #   config.data's per-class subsampling (0 = all of them)
      cue_conflict_path="",         # image_folder/tfds: a cue-conflict folder (docs/analyses/
                                    #   probing.md "Cue-conflict images"); synthetic uses its
                                    #   own split
  ))
  return _checked_update(data, fields, "probe_data")


def held_out_data(training_config, num_images: int, **fields) -> ml_collections.ConfigDict:
  """The evaluation data of a pretraining run's models: held-out images of its procedural
  generator (split "validation": never trained on), with the run's data seed, generator
  version and normalisation. The snapshots and the sweep analyse on it."""
  data = training_config.data
  return evaluation_data(source="synthetic", split="validation", num_images=num_images,
                         seed=data.seed, version=data.get("version", 1), mean=data.mean,
                         std=data.std, **fields)


def _checked_update(section, fields: dict, builder: str) -> ml_collections.ConfigDict:
  unknown = sorted(set(fields) - set(section.keys()))
  if unknown:
    raise ValueError(f"{builder}: unknown field {unknown[0]!r}; expected some of "
                     f"{', '.join(section.keys())}.")
  section.update(fields)
  return section
