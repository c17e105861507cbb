"""Closed-form ridge-regression probes from streamed moments (host side, float64).

A probe maps a feature x [D] to class scores Wᵀx + b [C] and predicts the arg-max. It is fitted
to one-hot targets y by ridge regression with an unpenalised intercept:

  minimise (1/n) Σ_i ||Wᵀ x_i + b - y_i||² + λ ||W||²_F

whose solution needs only the moments of the training set (`Moments`: n, Σx, Σxxᵀ, Σxyᵀ, Σy,
Σ||y||²): with μ = Σx/n, ȳ = Σy/n, the covariance Cxx = Σxxᵀ/n - μμᵀ and Cxy = Σxyᵀ/n - μȳᵀ,

  W = (Cxx + λI)⁻¹ Cxy,   b = ȳ - Wᵀμ.

So the features never have to sit in memory: the analysis streams the moments over the devices
(`clmim.analysis.probing`) and solves here. λ is given relative to the features' scale,
λ = α · tr(Cxx) / D (α is what the options and results.json call `ridge`), so one grid of α
suits features of any norm. One eigendecomposition of Cxx gives W for every α at once.

The squared error of any (W, b) on another set is exact from that set's moments too:

  Σ_i ||Wᵀx_i + b - y_i||² = tr(Wᵀ Σxxᵀ W) + 2 bᵀWᵀΣx + n bᵀb - 2 tr(Wᵀ Σxyᵀ) - 2 bᵀΣy + Σ||y||²,

which is how `select` picks α on a held-out part of the training images without a second pass:
the α with the smallest held-out squared error, then refitted on all the training images.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from clmim.errors import ClmimError

DEFAULT_RIDGE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclasses.dataclass
class Moments:
  """Sufficient statistics of a (features, one-hot targets) set, float64.

  Attributes: n (images), sx [D], sxx [D, D], sxy [D, C], sy [C], syy (Σ||y||², = n for one-hot).
  """
  n: float
  sx: np.ndarray
  sxx: np.ndarray
  sxy: np.ndarray
  sy: np.ndarray
  syy: float

  def __add__(self, other: "Moments") -> "Moments":
    return Moments(self.n + other.n, self.sx + other.sx, self.sxx + other.sxx,
                   self.sxy + other.sxy, self.sy + other.sy, self.syy + other.syy)

  @classmethod
  def of(cls, x: np.ndarray, y: np.ndarray) -> "Moments":
    """The moments of features x [n, D] and targets y [n, C] (a reference for tests)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return cls(float(len(x)), x.sum(0), x.T @ x, x.T @ y, y.sum(0), float((y * y).sum()))


def _centred(m: Moments):
  if m.n <= 0:
    raise ClmimError("a probe needs at least one training image; got none.")
  mu, ybar = m.sx / m.n, m.sy / m.n
  cxx = m.sxx / m.n - np.outer(mu, mu)
  cxx = (cxx + cxx.T) / 2  # exact symmetry for eigh; the float32 device sums are not
  cxy = m.sxy / m.n - np.outer(mu, ybar)
  return mu, ybar, cxx, cxy


def fit_path(m: Moments, alphas: Sequence[float]) -> list[tuple[np.ndarray, np.ndarray]]:
  """[(W [D, C], b [C])] for each relative ridge α, from one eigendecomposition."""
  mu, ybar, cxx, cxy = _centred(m)
  eigenvalues, vectors = np.linalg.eigh(cxx)
  eigenvalues = np.clip(eigenvalues, 0.0, None)  # round-off can make the smallest negative
  scale = max(float(np.trace(cxx)) / len(mu), np.finfo(np.float64).tiny)
  projected = vectors.T @ cxy
  out = []
  for alpha in alphas:
    w = vectors @ (projected / (eigenvalues + float(alpha) * scale)[:, None])
    out.append((w, ybar - w.T @ mu))
  return out


def fit(m: Moments, alpha: float) -> tuple[np.ndarray, np.ndarray]:
  """(W, b) of the ridge probe with relative regulariser α."""
  return fit_path(m, [alpha])[0]


def squared_error(w: np.ndarray, b: np.ndarray, m: Moments) -> float:
  """Σ_i ||Wᵀ x_i + b - y_i||² over the set with moments `m`, exactly."""
  # tr(Wᵀ Sxx W) as a sum of (Sxx W) ∘ W: two matmul-sized steps, not a three-operand loop.
  value = (np.sum((m.sxx @ w) * w) + 2 * b @ (w.T @ m.sx) + m.n * b @ b
           - 2 * np.sum(w * m.sxy) - 2 * b @ m.sy + m.syy)
  return float(value)


@dataclasses.dataclass
class Probe:
  """A fitted probe: weights [D, C], bias [C], the chosen α and the held-out squared error per
  α of the grid (mean per image; empty when α was given)."""
  weights: np.ndarray
  bias: np.ndarray
  ridge: float
  holdout_error: list


def select(fit_set: Moments, holdout: Moments, alphas: Sequence[float]) -> Probe:
  """The α of `alphas` with the least held-out squared error (the first on ties), refitted on
  fit_set + holdout. With one α, or an empty holdout, that α is used without selection."""
  alphas = [float(a) for a in alphas]
  if not alphas or any(not np.isfinite(a) or a < 0 for a in alphas):
    raise ClmimError(f"ridge values must be finite and >= 0; got {alphas}.")
  if len(alphas) == 1 or holdout.n <= 0:
    if len(alphas) > 1:
      raise ClmimError("choosing the ridge needs held-out training images (holdout_fraction "
                       "> 0) or a single ridge value.")
    w, b = fit(fit_set + holdout, alphas[0])
    return Probe(w, b, alphas[0], [])
  errors = [squared_error(w, b, holdout) / holdout.n for w, b in fit_path(fit_set, alphas)]
  best = alphas[int(np.nanargmin(errors))]
  w, b = fit(fit_set + holdout, best)
  return Probe(w, b, best, errors)
