r"""Throughput of the evaluation input pipeline alone (decode + resize + crop + normalise + batch).

Writes photo-like JPEGs (ImageNet-sized by default, or 224 px with --jpeg_size 224) to an image
folder and to a TFDS array_record split (no TensorFlow needed), then times
`EvalImages.load_batches` over them with 1 and 2 worker threads, for a ViT-B/16's 224 px bicubic
preprocessing. No model runs: the model's rate is given (--model_images_per_s, measured
separately, e.g. with benchmarks/analysis_overhead.py) and the JSON says which side bounds an
analysis run. It also times the header check every image-folder run does before streaming
(`header_check`: microseconds per image, no decode). Prints one JSON object; the machine's load
average is part of it.

  python benchmarks/input_pipeline.py [--num_images 96] [--workers 1,2] [--jpeg_size 500x375]
"""
import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from clmim.data.eval_data import EvalImages

VIT_B16 = {"image_size": 224, "crop_pct": 0.875, "interpolation": "bicubic",
           "mean": "imagenet", "std": "imagenet"}


def photo(w: int, h: int, seed: int) -> np.ndarray:
  """A photo-like uint8 image: gradients, a hard edge, texture and noise (JPEG-realistic)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  sky = np.stack([90 + 100 * yy, 140 + 80 * yy, 230 - 30 * yy], -1)
  ground = np.stack([60 + 40 * np.sin(280 * xx) * np.cos(150 * yy),
                     120 + 50 * rng.random((h, w)), 40 + 20 * yy], -1)
  image = np.where((yy > 0.4 + 0.05 * np.sin(9 * xx + seed))[..., None], ground, sky)
  return np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)


def write_data(root: str, n: int, size, classes: int = 4):
  """n JPEGs under root/folder/<class>/ and the same bytes as a TFDS array_record split."""
  jpegs = []
  for i in range(n):
    out = io.BytesIO()
    Image.fromarray(photo(size[0], size[1], i)).save(out, "JPEG", quality=90)
    jpegs.append(out.getvalue())
    folder = os.path.join(root, "folder", f"class_{i % classes}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{i:05d}.jpg"), "wb") as f:
      f.write(jpegs[-1])
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    return jpegs, None

  class ClmimBenchImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(num_classes=classes)}))

    def _split_generators(self, dl_manager):
      return {"validation": self._generate_examples()}

    def _generate_examples(self):
      for i, data in enumerate(jpegs):
        yield i, {"image": io.BytesIO(data), "label": i % classes}

  data_dir = os.path.join(root, "tfds")
  ClmimBenchImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return jpegs, data_dir


def time_source(data_cfg, workers: int, repeats: int, batch: int) -> dict:
  """Median images/s of full passes (after one warm-up pass) with `workers` threads."""
  data_cfg.num_workers = workers
  images = EvalImages(data_cfg, VIT_B16)
  indices = list(range(len(images)))
  for _ in images.load_batches(indices, batch):  # warm-up: page cache, thread start
    pass
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    count = sum(len(b[0]) for b in images.load_batches(indices, batch))
    rates.append(count / (time.perf_counter() - start))
  return {"images_per_s": round(statistics.median(rates), 2),
          "all_images_per_s": [round(r, 2) for r in rates], "route": images.description}


def time_header_check(folder: str, workers: int, repeats: int) -> dict:
  """Microseconds per image of the header check every image-folder run does before streaming
  (`clmim.data.image_check.inspect_all`: PIL opens each file's header; no decode)."""
  from clmim.data import image_check  # pylint: disable=import-outside-toplevel
  paths = sorted(os.path.join(base, name) for base, _, names in os.walk(folder)
                 for name in names)
  image_check.inspect_all(paths, progress=False, num_workers=workers)  # warm-up: page cache
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    reports = image_check.inspect_all(paths, progress=False, num_workers=workers)
    times.append(time.perf_counter() - start)
  assert not any(r.problem for r in reports), [r for r in reports if r.problem][:3]
  return {"us_per_image": round(1e6 * statistics.median(times) / len(paths), 1),
          "images": len(paths), "workers": workers}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_images", type=int, default=96)
  parser.add_argument("--workers", default="1,2")
  parser.add_argument("--jpeg_size", default="500x375", help="WxH of the JPEGs, or one number")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--model_images_per_s", type=float, default=3.1,
                      help="ViT-B/16 analysis forward rate on this machine (img/s), measured "
                      "separately; the default is the middle of the 2.7-3.5 img/s measured "
                      "here with the 2-core CPU shared.")
  args = parser.parse_args()
  w, _, h = args.jpeg_size.partition("x")
  size = (int(w), int(h or w))
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory() as root:
    with contextlib.redirect_stdout(sys.stderr):  # TFDS announces what it prepares
      jpegs, data_dir = write_data(root, args.num_images, size)
    base = dict(split="validation", num_images=0, seed=0, max_images_per_class=0,
                fraction_per_class=0.0, crop_pct=0.0, interpolation="", mean="", std="",
                tfds_name="", data_dir="", path="", max_batches=0, num_workers=0)
    sources = {"image_folder": dict(base, source="image_folder",
                                    path=os.path.join(root, "folder"))}
    if data_dir:
      sources["tfds_array_record"] = dict(base, source="tfds", tfds_name="clmim_bench_images",
                                          data_dir=data_dir)
    # Imported here, not at the top: device_check.py reuses `time_source` on machines without
    # ml_collections.
    import ml_collections
    results = {}
    for name, fields in sources.items():
      for workers in (int(x) for x in args.workers.split(",")):
        cfg = ml_collections.ConfigDict(fields)
        results[f"{name}/workers={workers}"] = time_source(cfg, workers, args.repeats, args.batch)
        # The JSON names no path of this machine (results get committed).
        results[f"{name}/workers={workers}"]["route"] = results[f"{name}/workers={workers}"][
            "route"].replace(root, "<temporary folder>")
    header_check = {f"workers={workers}": time_header_check(
        sources["image_folder"]["path"], workers, args.repeats)
                    for workers in (int(x) for x in args.workers.split(","))}
  best = max(r["images_per_s"] for r in results.values())
  model = args.model_images_per_s
  print(json.dumps({
      "benchmark": "input_pipeline",
      "what": "decode + resize shorter side to 256 (bicubic, antialiased) + centre crop 224 + "
              "normalise + batch, in worker threads; no model",
      "jpeg": {"size": list(size), "quality": 90, "count": args.num_images,
               "mean_kib": round(float(np.mean([len(j) for j in jpegs])) / 1024, 1)},
      "results": results,
      "header_check": header_check,
      "model_images_per_s": model,
      "model_rate_source": "reused measurement of a ViT-B/16 analysis forward on this machine "
                           "(not re-run by this benchmark)",
      "bound": "model" if best > model else "input pipeline",
      "pipeline_over_model": round(best / model, 1),
      "machine": {"cpus": os.cpu_count(),
                  "load_average_before": [round(x, 2) for x in load_before],
                  "load_average_after": [round(x, 2) for x in os.getloadavg()],
                  "python": platform.python_version(), "pillow": Image.__version__},
  }, indent=1))


if __name__ == "__main__":
  main()
