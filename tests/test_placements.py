"""Placements between the CL and MIM references: known answers and the not-separated case."""
import types

import numpy as np

from clmim.analysis import core
from clmim.jobs import placements

RESULT = core.Result("metric", "metric", "[block]", series=lambda v: list(v),
                     cl_direction="higher")
MODULE = types.SimpleNamespace(RESULTS=(RESULT,))


def _results(values):
  families = {"cl": "cl", "mim": "mim"}
  return {"models": {n: {"metric": [v, v]} for n, v in values.items()},
          "model_info": {n: {"family": families.get(n, "other")} for n in values}}


def test_known_placements_and_intervals():
  results = _results({"cl": 3.0, "mim": 1.0, "half": 2.0, "beyond": 4.0})
  rng = np.random.default_rng(0)
  noise = rng.normal(scale=0.01, size=(200, 1))
  reps = {n: {"metric": np.repeat(np.full((200, 1), v) + noise, 2, axis=1)}
          for n, v in {"cl": 3.0, "mim": 1.0, "half": 2.0, "beyond": 4.0}.items()}
  placed = placements.placements(results, [MODULE], reps)
  models = placed["findings"]["metric"]["models"]
  assert placed["cl_reference"] == "cl" and placed["mim_reference"] == "mim"
  assert models["cl"]["placement"] == 1.0 and models["mim"]["placement"] == 0.0
  assert models["half"]["placement"] == 0.5 and models["beyond"]["placement"] == 1.5
  # Paired replicates with the same noise: every draw places "half" at exactly 0.5.
  np.testing.assert_allclose(models["half"]["interval"], [0.5, 0.5], atol=1e-9)
  table = placements.markdown(placed)
  assert "| half | 0.50 [0.50, 0.50] |" in table and "| beyond | 1.50" in table


def test_references_that_do_not_differ_place_nothing():
  results = _results({"cl": 1.0, "mim": 1.0, "x": 2.0})
  placed = placements.placements(results, [MODULE])
  entry = placed["findings"]["metric"]
  assert entry["reason"] == "the CL and MIM references have the same value"
  assert all(r["placement"] is None for r in entry["models"].values())
  assert "| x | — |" in placements.markdown(placed)
  rng = np.random.default_rng(1)
  reps = {n: {"metric": rng.normal(size=(200, 2))} for n in ("cl", "mim", "x")}
  placed = placements.placements(_results({"cl": 1.1, "mim": 1.0, "x": 2.0}), [MODULE], reps)
  assert "do not differ beyond their 95 % interval" in placed["findings"]["metric"]["reason"]


def test_no_pair_no_placements():
  assert placements.placements(_results({"cl": 1.0, "x": 2.0}), [MODULE]) is None
