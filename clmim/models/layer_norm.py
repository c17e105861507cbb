"""LayerNorm with a hand-written gradient: the same function as flax's, fewer passes over memory.

Autodiff of a LayerNorm keeps full-size intermediates (the centred input, broadcasts of the
statistics) in memory: in a profile of the demo ViT's gradient, XLA:CPU spent ~3.5 ms on each
LayerNorm forward over [4160, 128] rows. Here the forward keeps only the normalised rows and
1/std, and the backward is the closed form

  dx = (g·γ − mean(g·γ) − x̂ · mean(g·γ · x̂)) / std,   dγ = Σ g·x̂,   dβ = Σ g,

with sums over rows for dγ, dβ and means over features for dx. Statistics and the gradient are
float32 whatever the input dtype (bfloat16 runs normalise in float32, as flax's LayerNorm does);
the variance is two-pass (mean of squared deviations), as in PyTorch.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def _statistics(x, epsilon):
  centred = x - x.mean(axis=-1, keepdims=True)
  inverse_std = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + epsilon)
  return centred * inverse_std, inverse_std


def _forward(x, scale, bias, epsilon):
  normalised, inverse_std = _statistics(x, epsilon)
  return normalised * scale + bias, (normalised, inverse_std, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _float32_layer_norm(x, scale, bias, epsilon):
  return _forward(x, scale, bias, epsilon)[0]


def _backward(epsilon, residuals, grad):
  del epsilon
  normalised, inverse_std, scale = residuals
  rows = tuple(range(grad.ndim - 1))
  grad_bias = grad.sum(axis=rows)
  grad_scale = (grad * normalised).sum(axis=rows)
  scaled = grad * scale
  grad_x = inverse_std * (scaled - scaled.mean(axis=-1, keepdims=True)
                          - normalised * (scaled * normalised).mean(axis=-1, keepdims=True))
  return grad_x, grad_scale, grad_bias


_float32_layer_norm.defvjp(_forward, _backward)


def layer_norm(x, scale, bias, epsilon: float = 1e-6, dtype=None):
  """(x − mean) / sqrt(var + epsilon) · scale + bias over the last axis, computed in float32.

  The result is in `dtype` (x's dtype when None); scale and bias are float32 [width].
  """
  out = _float32_layer_norm(x.astype(jnp.float32), scale.astype(jnp.float32),
                            bias.astype(jnp.float32), epsilon)
  return out.astype(dtype or x.dtype)


class LayerNorm(nn.Module):
  """Drop-in for `flax.linen.LayerNorm(epsilon, dtype)`: the same parameters ("scale", "bias")."""
  epsilon: float = 1e-6
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (width,))
    bias = self.param("bias", nn.initializers.zeros, (width,))
    return layer_norm(x, scale, bias, self.epsilon, self.dtype)
