"""clmim.jobs.readings: the sentences the notebooks print are derived from the results dict, for
any models (hand-made results dicts: crossing curves, one model, different depths, untrained
copies or none)."""
import re

import numpy as np

from clmim.jobs import readings


def _results(models, **config):
  """A results dict: models = {name: (family, {key: values}, extra model_info)}."""
  return {"models": {name: dict(values) for name, (_, values, _) in models.items()},
          "model_info": {name: {"family": family, **info}
                         for name, (family, _, info) in models.items()},
          "config": {"analysis_options": config}, "num_images": 8}


def _distance(cl, mim, **more):
  """attention_distance [block][head] of a CL and a MIM model, grid with uniform distance 16."""
  info = {"uniform_attention_distance": 16.0}
  models = {"cee": ("cl", {"attention_distance": cl}, info),
            "emm": ("mim", {"attention_distance": mim}, info)}
  models.update({k: (f, {"attention_distance": v}, {**info, **i}) for k, (f, v, i) in
                 more.items()})
  return _results(models)


CL = [[10, 12], [8, 8], [20, 22]]  # head means 11, 8, 21
MIM = [[9, 9], [10, 10], [12, 12]]  # 9, 10, 12


def test_curve_reading_compares_cl_and_mim_block_by_block():
  text = readings.reading(_distance(CL, MIM), "attention_distance")
  lines = text.splitlines()
  assert lines[0] == ("[reading: attention_distance] attention distance (px), mean over heads, "
                      "by block; the paper: CL higher than MIM")
  assert "  cee [CL]: 11.000, 8.000, 21.000 (highest at block 3, lowest at block 2)" in lines
  assert "  emm [MIM]: 9.000, 10.000, 12.000 (highest at block 3, lowest at block 1)" in lines
  assert "CL (cee) against MIM (emm): CL higher in blocks 1 and 3, lower in block 2." in text
  assert "The paper's direction (CL higher) holds in blocks 1 and 3, not in block 2." in text
  # The findings' later half of 3 blocks: blocks 2-3 -> CL 14.5, MIM 11.
  assert "Later half of the blocks (the findings' verdict): inconclusive: no bootstrap " \
         "interval." in text  # a hand-made results dict has no intervals
  assert "CL cee 14.500, MIM emm 11.000; gap (the paper's way > 0) +3.500." in text
  assert "Against the reference, uniform attention (16.000): cee above it in block 3, below " \
         "it in blocks 1-2; emm below it in every block." in text
  assert text.endswith("\n") and "\n\n" not in text


def test_curve_reading_of_a_lower_direction_over_stages():
  # effective_rank [state]: the stages are the even states (embedding, then each block).
  states = lambda *stages: [v for s in stages for v in (s, -1.0)][:-1]
  results = _results({"a": ("cl", {"effective_rank": states(5.0, 4.0, 2.0)}, {}),
                      "b": ("mim", {"effective_rank": states(4.0, 6.0, 7.0)}, {})})
  text = readings.reading(results, "effective_rank")
  assert "a [CL]: 5.000, 4.000, 2.000 (highest at the embedding, lowest at block 2)" in text
  assert "CL higher in the embedding, lower in blocks 1-2." in text
  assert "The paper's direction (CL lower) holds in blocks 1-2, not in the embedding." in text
  assert "gap (the paper's way > 0) +5.000." in text  # later half: block 2, 2.0 vs 7.0


def test_not_as_in_the_paper_and_holds_nowhere():
  text = readings.reading(_distance(MIM, CL), "attention_distance")  # swapped families
  assert "The paper's direction (CL higher) holds in block 2, not in blocks 1 and 3." in text
  assert "gap (the paper's way > 0) -3.500." in text
  flat = [[5, 5], [5, 5], [5, 5]]
  text = readings.reading(_distance(flat, [[6, 6]] * 3), "attention_distance")
  assert "CL lower in every block." in text and "holds nowhere." in text


def test_untrained_copies_show_what_training_changed():
  results = _distance(CL, MIM, **{
      "cee (untrained)": ("random", [[16, 16]] * 3, {"architecture_of": "cee"}),
      "shared (untrained)": ("random", [[5, 5], [10, 10], [15, 15]],
                             {"architecture_of": "x", "shared_by": ["x", "emm"]})})
  text = readings.reading(results, "attention_distance")
  assert "  cee (untrained) [untrained]: 16.000, 16.000, 16.000 (flat to 3 decimals)" in text
  assert ("What training changed, each trained model against its untrained copy: cee higher "
          "in block 3, lower in blocks 1-2; emm higher in block 1, lower in block 3, equal (to "
          "3 decimals) in block 2.") in text
  # The reference line is about the trained models only.
  assert "cee (untrained) above it" not in text and "No untrained copies" not in text
  text = readings.reading(_distance(CL, MIM), "attention_distance")
  assert "No untrained copies in this run (config.include_untrained = False)" in text


def test_one_model_or_one_family_has_no_comparison():
  results = _results({"cee": ("cl", {"nmi": [[0.5], [0.25]]}, {})})
  text = readings.reading(results, "nmi")
  assert "No CL-MIM comparison: this run has no MIM model with nmi" in text
  assert "paper's direction" not in text and "Later half" not in text
  results = _results({"o": ("other", {"nmi": [[0.5], [0.25]]}, {})})
  assert "this run has no CL and MIM model" in readings.reading(results, "nmi")


def test_models_of_different_depths_are_compared_over_the_later_half():
  results = _distance([[1, 1], [2, 2]], [[4, 4], [4, 4], [0, 0], [0, 0]])
  text = readings.reading(results, "attention_distance")
  assert "cee and emm have curves of different lengths (2 and 4 points)" in text
  assert "CL cee 2.000, MIM emm 0.000; gap (the paper's way > 0) +2.000." in text
  assert "CL higher in" not in text


def test_several_models_of_a_family_name_the_pair_compared():
  results = _distance(CL, MIM, cee2=("cl", MIM, {}))
  assert "CL (cee) against MIM (emm; the first of each, as in the findings)" in \
      readings.reading(results, "attention_distance")


def test_a_curve_without_a_paper_direction_or_reference():
  results = _results({"a": ("cl", {"feature_variance": [0.5, 0.25]}, {}),
                      "b": ("mim", {"feature_variance": [0.5, 0.75]}, {})},
                     feature_variance={"normalize": True})
  text = readings.reading(results, "feature_variance")
  assert text.startswith("[reading: feature_variance] feature map variance, by stage, "
                         "normalised")
  assert "CL lower in block 1, equal (to 3 decimals) in the embedding." in text
  assert "paper" not in text and "reference" not in text


def _maps(peaks, grid=4, heads=2):
  """[image][query][block=1][head][g][g] maps with all mass at the given (x, y) peaks."""
  maps = np.full((len(peaks), len(peaks[0]), 1, heads, grid, grid), 0.01)
  for i, row in enumerate(peaks):
    for q, (x, y) in enumerate(row):
      maps[i, q, 0, :, y, x] = 1.0
  return maps.tolist()


def test_attention_map_reading_counts_shared_and_local_peaks():
  kept = lambda peaks: {"images": [0, 3], "queries": [[2, 2], [1, 1]], "blocks": [2],
                        "maps": _maps(peaks)}
  results = _results({
      "cee": ("cl", {"attention_maps": kept([[(0, 3), (0, 3)], [(3, 0), (3, 0)]]),
                     "query_map_similarity": [0.5, 0.9],
                     "attention_entropy": [[1, 1], [0.25, 0.75]],
                     "object_attention_cls": [[0, 0], [0.75, 0.25]],
                     "object_attention_details": {"object_token_share": 0.2}}, {}),
      "emm": ("mim", {"attention_maps": kept([[(2, 2), (1, 1)], [(3, 3), (0, 0)]]),
                      "query_map_similarity": [0.5, 0.125]}, {})})
  text = readings.reading(results, "attention_maps")
  assert text.splitlines()[0] == ("[reading: attention_maps, query_map_similarity, "
                                  "attention_entropy, object_attention_cls] attention maps of "
                                  "query patches")
  assert ("cee [CL], block 2: the 2 queries' maps peak at the same patch in 2 of 2 images; "
          "query (2, 2)'s map peaks on or next to the query in 0 of 2 (at (0, 3), (3, 0)).") in text
  assert "queries' maps alike (cosine) 0.900; attention entropy 0.500; cls attention on the " \
         "object 0.500." in text
  assert "emm [MIM], block 2: the 2 queries' maps peak at the same patch in 0 of 2 images; " \
         "query (2, 2)'s map peaks on or next to the query in 2 of 2 (at (2, 2), (3, 3))." in text
  assert "queries' maps alike (cosine) 0.125." in text
  assert "puts 0.200 on the object (the object's share of the tokens)" in text


def test_extras_quote_the_other_panels_values():
  results = _results({
      "a": ("cl", {"tsne_knn_image_accuracy": [0.5, 0.75], "tsne_knn_image_accuracy_state": 0.75,
                   "tsne_knn_image_accuracy_2d": 0.625}, {}),
      "b": ("mim", {"tsne_knn_image_accuracy": [0.5, 0.25], "tsne_knn_image_accuracy_state": 0.25,
                    "tsne_knn_image_accuracy_2d": None}, {})}, tsne={"state": 3})
  text = readings.reading(results, "tsne_knn_image_accuracy")
  assert text.startswith("[reading: tsne_knn_image_accuracy, tsne_knn_image_accuracy_state, "
                         "tsne_knn_image_accuracy_2d]")
  assert "(state 3), in token space: a 0.750, b 0.250." in text
  assert "The same in the 2-D t-SNE embedding: a 0.625." in text


def test_every_quoted_decimal_is_a_value_of_the_results():
  results = _distance(CL, MIM, **{"cee (untrained)": ("random", [[16, 17]] * 3,
                                                      {"architecture_of": "cee"})})
  text = readings.reading(results, "attention_distance")
  values = {"11.000", "8.000", "21.000", "9.000", "10.000", "12.000", "16.500", "14.500",
            "16.000", "3.500"}  # the last: the findings' gap, 14.5 - 11 (results["findings"])
  assert set(re.findall(r"-?\d+\.\d+", text)) == values


def test_a_key_outside_the_run_says_so():
  results = _distance(CL, MIM)
  assert readings.reading(results, "nmi") == \
      "[reading: nmi] not in this run's results (is its analysis in config.analyses?)\n"


def test_show_prints_each_reading_and_a_blank_line(capsys):
  results = _distance(CL, MIM)
  readings.show(results, "attention_distance", "nmi")
  out = capsys.readouterr().out
  assert out == readings.reading(results, "attention_distance") + "\n" + \
      readings.reading(results, "nmi") + "\n"


def test_models_without_the_quantity_are_left_out_of_a_reading():
  """attention_to_registers is None for a model without registers: no curve for it, and a run
  where no model has one says so instead of failing."""
  models = {"reg": ("cl", {"attention_to_registers": [[0.2, 0.4], [0.5, 0.5]]}, {}),
            "plain": ("mim", {"attention_to_registers": None}, {})}
  text = readings.reading(_results(models), "attention_to_registers")
  assert "  reg [CL]: 0.300, 0.500" in text and "plain" not in text
  none = {"plain": ("mim", {"attention_to_registers": None}, {})}
  assert "no model of this run has it" in readings.reading(_results(none),
                                                           "attention_to_registers")
