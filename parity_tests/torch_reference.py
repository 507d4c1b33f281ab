"""Runs a real torch BatchNorm and a jaxbn layer side by side, step by step.

Only test plumbing lives here: copying a torch module's tensors into Flax variables (the
converter proper is a separate feature), moving the channel axis, and one jitted jaxbn step
that returns what torch's ``forward`` + ``backward`` give.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

import jaxbn
from jaxbn._src.checkpoints.files import numpy_to_tensor, tensor_to_numpy

TORCH_DTYPES = {
    np.dtype(np.float16): torch.float16,
    np.dtype(jnp.bfloat16): torch.bfloat16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
}
TORCH_BN = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}


# Copies both ways (torch updates its buffers in place), dtypes kept, bfloat16 included.
to_numpy = tensor_to_numpy
to_torch = numpy_to_tensor


def variables_from_torch(module: torch.nn.Module) -> dict:
  """A torch BatchNorm's tensors as jaxbn.BatchNorm variables (same values, same dtypes)."""
  variables = {}
  params = {name: to_numpy(t) for name, t in (("scale", module.weight), ("bias", module.bias)) if t is not None}
  if params:
    variables["params"] = params
  if module.running_mean is not None:
    variables["batch_stats"] = {
        "mean": to_numpy(module.running_mean),
        "var": to_numpy(module.running_var),
        "num_batches_tracked": np.asarray(module.num_batches_tracked.item(), jax.dtypes.canonicalize_dtype(np.int64)),
    }
  return variables


@dataclasses.dataclass
class Config:
  """One torch BatchNorm configuration and the matching jaxbn layer."""

  channels: int = 3
  momentum: float | None = 0.1
  eps: float = 1e-5
  affine: bool = True
  track_running_stats: bool = True
  channels_last: bool = False
  dtype: type = np.float32  # the module's (params and buffers) dtype
  api: str = "linen"  # or "nnx": the same matrix runs jaxbn.nnx.BatchNorm through NNXLayer

  def torch_module(self, rank: int) -> torch.nn.Module:
    module = TORCH_BN[rank](
        self.channels,
        eps=self.eps,
        momentum=self.momentum,
        affine=self.affine,
        track_running_stats=self.track_running_stats,
        dtype=TORCH_DTYPES[np.dtype(self.dtype)],
    )
    if self.affine:  # non-trivial affine parameters, so scale and bias errors would show
      generator = torch.Generator().manual_seed(0)
      with torch.no_grad():
        module.weight.copy_(torch.rand(self.channels, generator=generator) + 0.5)
        module.bias.copy_(torch.randn(self.channels, generator=generator))
    return module

  def jax_module(self):
    """jaxbn.BatchNorm, or for ``api="nnx"`` a jaxbn.nnx.BatchNorm behind the same ``apply``."""
    options = dict(
        axis=-1 if self.channels_last else 1,
        momentum=self.momentum,
        epsilon=self.eps,
        use_scale=self.affine,
        use_bias=self.affine,
        track_running_stats=self.track_running_stats,
        param_dtype=self.dtype,
    )
    with warnings.catch_warnings():  # momentum=1.0 is tested on purpose
      warnings.simplefilter("ignore", jaxbn.MomentumConventionWarning)
      if self.api == "nnx":
        return NNXLayer(jaxbn.nnx.BatchNorm(self.channels, **options, rngs=nnx.Rngs(0)))
      return jaxbn.BatchNorm(**options)

  def to_layout(self, x_nchw: np.ndarray) -> np.ndarray:
    return np.moveaxis(x_nchw, 1, -1) if self.channels_last else x_nchw

  def from_layout(self, x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, -1, 1) if self.channels_last else x


APIS = ["linen", "nnx"]


class NNXLayer:
  """Test plumbing: an NNX layer behind Linen's ``apply(variables, x, use_running_average,
  mutable=...)``, so one parity matrix runs both APIs. The layer's state is replaced by
  ``variables`` (jaxbn.nnx.update) on each call; the updated running statistics come back as
  Linen's ``batch_stats``."""

  def __init__(self, layer: nnx.Module):
    self.graphdef, self.state = nnx.split(layer)

  def apply(self, variables, x, use_running_average=None, *, mutable=False, **kwargs):
    layer = nnx.merge(self.graphdef, jaxbn.nnx.update(self.state, variables))
    y = layer(x, use_running_average, **kwargs)
    if not mutable:
      return y
    return y, {k: v for k, v in jaxbn.nnx.to_variables(layer).items() if k in mutable}


def make_batchnorm(api: str, channels: int, **options):
  """jaxbn.BatchNorm(**options), or for ``api="nnx"`` jaxbn.nnx.BatchNorm behind NNXLayer."""
  if api == "nnx":
    return NNXLayer(jaxbn.nnx.BatchNorm(channels, use_running_average=None, **options, rngs=nnx.Rngs(0)))
  return jaxbn.BatchNorm(**options)


def jax_step(module: jaxbn.BatchNorm, train: bool) -> Callable:
  """(variables, x, cotangent) -> (y, new batch_stats, dL/dx, dL/dparams) for L = sum(y * cot)."""

  def step(variables, x, cotangent):
    params = variables.get("params", {})
    rest = {k: v for k, v in variables.items() if k != "params"}

    def forward(x, params):
      return module.apply({"params": params, **rest}, x, use_running_average=not train, mutable=["batch_stats"])

    y, vjp, updates = jax.vjp(forward, x, params, has_aux=True)
    dx, dparams = vjp(jnp.asarray(cotangent, y.dtype))
    return y, updates.get("batch_stats"), dx, dparams

  return jax.jit(step)


@dataclasses.dataclass
class StepResult:
  y: np.ndarray
  dx: np.ndarray
  dparams: dict
  batch_stats: dict | None


def torch_step(module: torch.nn.Module, x: np.ndarray, cotangent: np.ndarray) -> StepResult:
  xt = to_torch(x).requires_grad_(True)
  module.zero_grad(set_to_none=True)
  y = module(xt)
  loss_dtype = torch.promote_types(y.dtype, torch.float32)  # half outputs: the loss in float32
  (y.to(loss_dtype) * to_torch(cotangent).to(loss_dtype)).sum().backward()
  dparams = {}
  if module.weight is not None:
    dparams = {"scale": to_numpy(module.weight.grad), "bias": to_numpy(module.bias.grad)}
  stats = variables_from_torch(module).get("batch_stats")
  return StepResult(to_numpy(y), to_numpy(xt.grad), dparams, stats)


def random_batch(rng: np.random.Generator, shape, dtype, channel_axis=1):
  """Unit-scale data with a different mean and spread per channel and per call."""
  channels = shape[channel_axis]
  bshape = [1] * len(shape)
  bshape[channel_axis] = channels
  mean = rng.uniform(-1, 1, channels).reshape(bshape)
  std = rng.uniform(0.5, 2, channels).reshape(bshape)
  return (rng.standard_normal(shape) * std + mean).astype(dtype)


def classification_train_step(model, tx, eval_prefixes=()) -> Callable:
  """A jitted optax step of ``model`` (called with ``train=True``) on softmax cross-entropy:
  (params, batch_stats, opt_state, x, labels) -> (params, batch_stats, opt_state, logits, grads).
  ``eval_prefixes`` are held in eval mode with jaxbn.eval_mode."""

  @jax.jit
  def step(params, batch_stats, opt_state, x, labels):
    def loss(params):
      with jaxbn.eval_mode(*eval_prefixes):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), (logits, updates)

    grads, (logits, updates) = jax.grad(loss, has_aux=True)(params)
    param_updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, param_updates), updates["batch_stats"], opt_state, logits, grads

  return step
