"""Python state a forward computes from shapes and caches on its module (YOLO's Detect head:
anchors and strides from the feature map's shape, rebuilt when the shape changes), against real
torch: the port traces the computation for the example, leaves the torch model's attributes as
it found them, and at apply time either recomputes for a new shape (the cache was empty: the
program computes it) or, where the trace read a filled cache, refuses another shape by name
instead of silently using the cached values. A cache outside the modules (``functools.lru_cache``
in the model's code) keeps the trace's proxies: the port keeps nothing of torch's run alive
through them. Tolerance: float32 rounding, 1e-6 of the largest output (anchor coordinates up to 100)."""

from __future__ import annotations

import functools
import gc
import weakref

import numpy as np
import pytest
import torch

import jaxbn


class AnchorHead(torch.nn.Module):
  """The shape of ultralytics' Detect: anchors from the grid, cached with the shape they are for."""

  def __init__(self, stride=8.0):
    super().__init__()
    self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    self.bn = torch.nn.BatchNorm2d(4)
    self.stride = stride
    self.shape = None
    self.anchors = torch.empty(0)

  def forward(self, x):
    y = self.bn(self.conv(x))
    shape = y.shape
    if self.shape != shape:  # rebuilt only when the input's shape changes
      h, w = shape[2], shape[3]
      grid_y, grid_x = torch.meshgrid(
          torch.arange(h, dtype=y.dtype) + 0.5, torch.arange(w, dtype=y.dtype) + 0.5, indexing="ij"
      )
      self.anchors = torch.stack((grid_x, grid_y), -1).view(-1, 2) * self.stride
      self.shape = shape
    return y.flatten(2).transpose(1, 2)[..., :2] + self.anchors


@functools.lru_cache(maxsize=32)
def _half(width):
  """A cache in the model's code, outside its modules, keyed on a traced size (transformers'
  RT-DETR caches its position embedding so): it keeps every trace's result, a proxy."""
  return width * 0.5


class GloballyCached(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.bn = torch.nn.BatchNorm2d(3)

  def forward(self, x):
    return self.bn(x) * _half(x.shape[-1])


def image(size, seed=1):
  return np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype(np.float32)


def close_to_torch(port, model, x):
  with torch.no_grad():
    expected = model(torch.from_numpy(x)).numpy()
  ours = np.asarray(port.module.apply(port.variables, x))
  assert ours.shape == expected.shape
  np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_an_empty_cache_is_computed_by_the_program_for_every_shape():
  torch.manual_seed(0)
  model = AnchorHead().eval()
  port = jaxbn.port(model, image(8))
  assert model.shape is None and model.anchors.shape == (0,)  # left as found (no traced values)
  for size in (8, 12):
    close_to_torch(port, model, image(size))


def test_a_filled_cache_is_used_for_its_shape_and_refused_for_another():
  torch.manual_seed(0)
  model = AnchorHead().eval()
  with torch.no_grad():
    model(torch.from_numpy(image(8)))  # torch filled its cache for 8x8
  anchors = model.anchors
  port = jaxbn.port(model, image(8))
  assert model.anchors is anchors and model.shape == (2, 4, 8, 8)
  close_to_torch(port, model, image(8, seed=2))
  with pytest.raises(jaxbn.PortError, match=r"if self.shape != shape:.*specialised this Python branch"):
    port.module.apply(port.variables, image(12))


def test_a_cache_in_the_models_code_keeps_nothing_of_torchs_run_alive():
  # Before the tracer dropped torch's run once its program was built, the cache's proxies kept the
  # model and every intermediate value on the example alive: RT-DETR's verify grew to 24 GB.
  torch.manual_seed(0)
  model = GloballyCached().eval()
  port = jaxbn.port(model, image(8))
  assert _half.cache_info().currsize >= 2  # a proxy from each mode's trace: the cache holds them
  close_to_torch(port, model, image(8, seed=2))
  again = jaxbn.port(model, image(8))  # another trace: a new proxy, no other trace's value
  close_to_torch(again, model, image(8, seed=3))
  alive = weakref.ref(model)
  del model
  gc.collect()
  assert alive() is None, "the port's trace kept the torch model alive through the cache"
