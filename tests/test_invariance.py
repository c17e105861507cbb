"""Exactness on a real ViT: the same numbers for any batching, padding and device count."""

import numpy as np
import pytest

import analysis_testing

from clmim.analysis import attention_distance, fourier, nmi

ANALYSES = [attention_distance, nmi, fourier]


@pytest.fixture(scope="module")
def setup():
  return analysis_testing.small_vit()


def _run(setup, batch_size, devices=8, device_batch_size=4):
  return analysis_testing.run_stream(setup, ANALYSES, batch_size, devices, device_batch_size)


@pytest.fixture(scope="module")
def reference(setup):
  return _run(setup, 64)


def _assert_same(got, want, rtol=1e-6):
  for key in ("attention_distance", "nmi", "attention_entropy", "fourier", "fourier_all_states"):
    np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=1e-7, err_msg=key)
  assert got["num_images"] == want["num_images"] == 70


@pytest.mark.parametrize("batch_size", [1, 7])
def test_vit_batch_size_invariance(setup, reference, batch_size):
  _assert_same(_run(setup, batch_size), reference)


def test_vit_one_vs_eight_devices(setup, reference):
  _assert_same(_run(setup, 7, devices=1, device_batch_size=4), reference)


def test_attention_is_not_trivial(reference):
  # Guards the invariance tests above against comparing uniform attention with itself.
  entropy = np.asarray(reference["attention_entropy"])
  assert entropy.min() < 0.9
