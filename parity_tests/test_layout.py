"""Channels-last source (``jaxbn.emit(layout="NHWC")``), against real torch.

Each model is emitted as NHWC source, loaded, and trained beside torch by ``jaxbn.verify(via="emit",
layout="NHWC")``: the round trip bit for bit, eval and a training step in float32 from identical
parameters (within 1e-5 of the largest output: shallow models), and in float64 every output,
gradient, running statistic and updated parameter within 1e-9 (relative), the inputs transposed
by the source's ``INPUT_AXES`` and its outputs back by ``OUTPUT_AXES``. The source itself is read
too: the layout's rules write each op's axes for channels-last input, and a transpose only where
torch's order decides the result.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jaxbn

FLOOR = 1e-5  # float32 from identical parameters, relative to the largest output (shallow models)


class LayoutOps(torch.nn.Module):
  """One of each op the channels-last pass rewrites: convolutions and BatchNorm, a (C, 1, 1)
  parameter and a (C,) one viewed (1, C, 1, 1), permute to NHWC and back around LayerNorm and
  Linear (ConvNeXt), cat and chunk over channels, an SE-style mean, a channel shuffle (view,
  transpose, reshape with sizes read from x.shape), reflect padding, max pooling in ceil mode, a
  transposed convolution, GroupNorm, PReLU, bilinear interpolation, slices over space (width alone:
  not JAX's last axis, so no ``x[..., s]``), average
  pooling without the padding's count, adaptive pooling, softmax and sum over channels, amax over
  space indexed back with None, a flatten of channels and space into a Linear, and an output
  indexed and unsqueezed."""

  def __init__(self):
    super().__init__()
    self.stem = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    self.bn = torch.nn.BatchNorm2d(8)
    self.scale = torch.nn.Parameter(torch.rand(8, 1, 1) + 0.5)
    self.shift = torch.nn.Parameter(torch.randn(8))
    self.norm = torch.nn.LayerNorm(8)
    self.fc = torch.nn.Linear(8, 8)
    self.up = torch.nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1)
    self.gn = torch.nn.GroupNorm(2, 8)
    self.act = torch.nn.PReLU(8)
    self.head = torch.nn.Linear(8 * 3 * 3, 10)

  def forward(self, x):
    x = F.relu(self.bn(self.stem(x)))
    x = x * self.scale + self.shift.view(1, -1, 1, 1)
    y = self.fc(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
    x = torch.cat([x, y], dim=1)
    a, b = x.chunk(2, dim=1)
    x = a * torch.sigmoid(b.mean((2, 3), keepdim=True))
    n, c, h, w = x.shape
    x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
    x = F.pad(x, (1, 0, 0, 1), mode="reflect")
    x = F.max_pool2d(x, 3, stride=2, ceil_mode=True)
    x = self.act(self.gn(self.up(x)))
    x = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
    x = x[:, :, 1:, :-1] + x[:, :, :-1, 1:]
    x = torch.cat([x[:, :, :, 0::2], x[:, :, :, 1::2]], dim=3)  # width's even then odd columns
    x = F.avg_pool2d(x, 2, stride=1, padding=1, count_include_pad=False)
    x = F.adaptive_avg_pool2d(x, (3, 3))
    x = torch.softmax(x, dim=1) * x.sum(1, keepdim=True) + x.amax(dim=(2, 3))[:, :, None, None]
    return self.head(torch.flatten(x, 1)), x[:, 2:5].unsqueeze(-1)


class Sequence1d(torch.nn.Module):
  """NCL input taken as NLC: Conv1d, BatchNorm1d, pooling and nearest upsampling over length,
  a mean over length into a Linear."""

  def __init__(self):
    super().__init__()
    self.conv = torch.nn.Conv1d(4, 8, 3, padding=1)
    self.bn = torch.nn.BatchNorm1d(8, momentum=None)
    self.pool = torch.nn.MaxPool1d(2)
    self.up = torch.nn.Upsample(scale_factor=2, mode="nearest")
    self.fc = torch.nn.Linear(8, 3)

  def forward(self, x):
    x = self.up(self.pool(F.relu(self.bn(self.conv(x)))))
    return self.fc(x.mean(-1))


class Unruled(torch.nn.Module):
  """An op the pass has no rule for (a cumulative sum over channels): its input is transposed to
  torch's layout there and back after, and the result is torch's."""

  def __init__(self):
    super().__init__()
    self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    self.bn = torch.nn.BatchNorm2d(4)
    self.out = torch.nn.Conv2d(4, 4, 1)

  def forward(self, x):
    x = torch.cumsum(self.bn(self.conv(x)), dim=1)
    return self.out(x)


class SamePadded(torch.nn.Module):
  """TensorFlow's "SAME" padding as timm writes it (nasnet, every tf_* model): Conv2dSame, a
  depthwise one, and MaxPool2dSame, which pad by sizes read in forward; and a functional
  convolution with a fixed filter (timm's blur pool) on a padded input."""

  def __init__(self):
    super().__init__()
    from timm.layers import Conv2dSame
    from timm.layers.pool2d_same import MaxPool2dSame

    self.stem = Conv2dSame(3, 8, 3, stride=2)
    self.depthwise = Conv2dSame(8, 8, 5, stride=2, groups=8, bias=False)
    self.bn = torch.nn.BatchNorm2d(8)
    self.pool = MaxPool2dSame(3, 2)
    self.register_buffer("blur", torch.full((8, 1, 2, 2), 0.25), persistent=False)
    self.head = torch.nn.Linear(8, 10)

  def forward(self, x):
    x = self.pool(self.bn(self.depthwise(F.relu(self.stem(x)))))
    x = F.conv2d(F.pad(x, (0, 1, 0, 1)), self.blur, stride=2, groups=8)
    return self.head(x.mean((2, 3)))


def emitted(model, x, tmp_path, api="linen") -> str:
  return jaxbn.emit(model, x, tmp_path / "nhwc", api=api, layout="NHWC").read_text()


def verified(model, shape, api):
  torch.manual_seed(0)
  example = np.zeros(shape, np.float32)
  jaxbn.verification.warm_up(model, example)
  result = jaxbn.verify(model, example, via="emit", api=api, layout="NHWC", steps=1, floor=FLOOR)
  assert result.passed, result.summary()
  assert result.target == f"jaxbn.emit source (api={api!r}, layout='NHWC')"
  return result


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_every_rewritten_op_trains_like_torch(api):
  torch.manual_seed(0)
  verified(LayoutOps(), (4, 3, 16, 16), api)


def test_source_writes_each_op_for_channels_last_and_transposes_only_where_torch_order_decides(tmp_path):
  torch.manual_seed(0)
  text = emitted(LayoutOps(), np.zeros((4, 3, 16, 16), np.float32), tmp_path)
  assert "INPUT_AXES = [(0, 2, 3, 1)]" in text
  assert "OUTPUT_AXES = [(0, 1), (0, 2, 3, 4, 1)]" in text  # logits as torch's; the slice NHWC-like
  assert 'nn.Conv(features=8, kernel_size=(3, 3), padding=1, use_bias=False, name="stem")' in text
  assert 'jaxbn.BatchNorm(momentum=0.1, epsilon=1e-05, name="bn")' in text  # axis=-1, the default
  assert "nn.ConvTranspose(" in text and "transpose_kernel=True" in text
  assert "nn.GroupNorm(num_groups=2, epsilon=1e-05, use_fast_variance=False" in text
  assert 'nn.Dense(features=8, name="fc")' in text and "ops.permute" not in text  # permutes move nothing
  assert "jnp.reshape(y, (1, 1, 1, -1))" in text and "ops.reshape(y1, 1, 1, 1, -1)" in text  # (C,1,1), view(1,-1,1,1)
  for written in (
      "ops.cat([x, y2], dim=3)",
      "ops.chunk(x, 2, dim=3)",
      "ops.mean(x, (1, 2), keepdim=True)",
      'ops.pad(y3, (0, 0, 1, 0, 0, 1), mode="reflect")',
      "ops.max_pool2d(y3, 3, stride=2, ceil_mode=True, channels_last=True)",
      "ops.prelu(x, y, axis=-1)",
      "channels_last=True)",
      "y3[:, 1:, :-1]",
      "y9[:, :, 0::2]",  # torch's x[:, :, :, 0::2]: width, JAX's axis 2
      "ops.cat([y10, y9], dim=2)",
      "nn.avg_pool(y10, (2, 2), padding=((1, 1), (1, 1)), count_include_pad=False)",
      "ops.softmax(y10, dim=3)",
      "ops.amax(y10, dim=(1, 2))",
      "y10[:, None, None]",
  ):
    assert written in text, written
  # two transposes: the channel shuffle's swap of its two channel axes, and NCHW before the
  # flatten whose order the head's weights are in
  transposes = re.findall(r"jnp\.transpose\([^)]*\)\)", text)
  assert transposes == ["jnp.transpose(y3, (0, 1, 2, 4, 3))", "jnp.transpose(y11, (0, 3, 1, 2))"], transposes


def test_length_axis_is_channels_last_for_one_dimensional_models():
  torch.manual_seed(0)
  verified(Sequence1d(), (4, 4, 12), "linen")


def test_an_op_without_a_rule_runs_in_torch_layout(tmp_path):
  torch.manual_seed(0)
  model = Unruled()
  verified(model, (2, 3, 8, 8), "linen")
  text = emitted(model, np.zeros((2, 3, 8, 8), np.float32), tmp_path)
  assert re.search(r"jnp\.transpose\(\w+, \(0, 3, 1, 2\)\)\n\s+\w+ = ops\.cumsum\(", text), text
  assert "jnp.transpose(x, (0, 2, 3, 1))" in text  # back to channels-last for the next Conv


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_same_padding_and_a_functional_convolution_stay_channels_last(api, tmp_path):
  """Conv2dSame is Flax's own convolution with its default padding, "SAME" (TensorFlow's, which
  pad_same computes); the pads computed from sizes and F.conv2d's filter, kept in torch's
  (out, in / groups, kH, kW), take channels-last input: the source transposes nothing. Odd sizes
  (23 px) pad one more pixel after than before."""
  pytest.importorskip("timm", reason="timm is in the test extra")
  torch.manual_seed(0)
  model = SamePadded()
  verified(model, (2, 3, 23, 23), api)
  text = emitted(model, np.zeros((2, 3, 23, 23), np.float32), tmp_path, api)
  assert not re.search(r"jnp\.transpose\(\w+, \(", text), text  # (the header names jnp.transpose(x, axes))
  stem = (
      'nn.Conv(features=8, kernel_size=(3, 3), strides=2, name="stem")'
      if api == "linen"
      else "nnx.Conv(in_features=3, out_features=8, kernel_size=(3, 3), strides=2, rngs=rngs)"
  )
  assert stem in text
  assert re.search(r"ops\.pad\(\w+, \(0, 0, \w+, \w+, \w+, \w+\), value=-math\.inf\)", text), text  # (C, W, H)
  assert "ops.pad(x, (0, 0, 0, 1, 0, 1))" in text  # F.pad's (W, H) as (C, W, H) from the last axis
  assert "ops.conv(x, y, stride=2, groups=8, channels_last=True)" in text


def test_same_padding_is_a_convolution_layer_in_torchs_layout_too(tmp_path):
  pytest.importorskip("timm", reason="timm is in the test extra")
  torch.manual_seed(0)
  model, example = SamePadded(), np.zeros((2, 3, 23, 23), np.float32)
  jaxbn.verification.warm_up(model, example)
  result = jaxbn.verify(model, example, via="emit", steps=1, floor=FLOOR)
  assert result.passed, result.summary()
  text = jaxbn.emit(model, example, tmp_path / "nchw").read_text()
  assert 'layers.Conv(features=8, kernel_size=3, strides=2, padding="SAME", name="stem")' in text


def test_global_pooling_and_flatten_need_no_transpose(tmp_path):
  """torchvision's resnet head: a mean over space and a flatten of (N, C, 1, 1), as written by hand."""
  import torchvision

  torch.manual_seed(0)
  model = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
  text = emitted(model, np.zeros((2, 3, 32, 32), np.float32), tmp_path)
  assert not re.search(r"= jnp\.transpose\(", text)
  assert "x = jnp.mean(x, axis=(1, 2), keepdims=True)\n    x = ops.flatten(x, 1)" in text
  assert "x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))" in text


class Tokens(torch.nn.Module):
  """(N, L, features) into a Linear, then BatchNorm1d over features after a transpose (NCL)."""

  def __init__(self):
    super().__init__()
    self.fc, self.bn = torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4)

  def forward(self, x):
    return self.bn(self.fc(x).transpose(1, 2))


def test_a_sequence_read_by_a_linear_is_taken_as_torchs_and_its_transpose_moves_nothing(tmp_path):
  torch.manual_seed(0)
  verified(Tokens(), (4, 5, 6), "linen")
  text = emitted(Tokens(), np.zeros((4, 5, 6), np.float32), tmp_path)
  assert "INPUT_AXES = [(0, 1, 2)]" in text and "OUTPUT_AXES = [(0, 2, 1)]" in text  # BatchNorm's output NLC
  assert not re.search(r"= jnp\.transpose\(", text)


class ConvNeXtBlock(torch.nn.Module):
  """torchvision's ConvNeXt block: permutes to NHWC and back as modules (torchvision.ops.Permute),
  inside a Sequential and outside."""

  def __init__(self):
    super().__init__()
    from torchvision.ops import Permute

    self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
    self.block = torch.nn.Sequential(
        torch.nn.Conv2d(8, 8, 7, padding=3, groups=8), Permute([0, 2, 3, 1]), torch.nn.LayerNorm(8),
        torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8), Permute([0, 3, 1, 2]),
    )  # fmt: skip
    self.to_nhwc, self.bn = Permute([0, 2, 3, 1]), torch.nn.BatchNorm2d(8)

  def forward(self, x):
    x = self.stem(x)
    x = x + self.block(x)
    return self.to_nhwc(self.bn(x))


def test_a_module_that_only_permutes_is_no_class_in_channels_last_source(tmp_path):
  """Its calls write nothing; inside a Sequential it is ``ops.identity``, a placeholder at torch's
  index, so that the layers after it keep their paths (none after the last layer)."""
  torch.manual_seed(0)
  verified(ConvNeXtBlock(), (2, 3, 8, 8), "linen")
  text = emitted(ConvNeXtBlock(), np.zeros((2, 3, 8, 8), np.float32), tmp_path)
  assert "class Permute" not in text and "Permute(" not in text
  assert text.count("ops.identity") == 1  # the Sequential's placeholder before its LayerNorm
  assert "OUTPUT_AXES = [(0, 1, 2, 3)]" in text  # torch's output is NHWC already: as torch's


class SplitBlocks(torch.nn.Module):
  """ultralytics' C2f: a list of a chunk's halves grown by blocks, concatenated over channels; a
  forward with an optional keyword the example does not give (``augment=False``)."""

  def __init__(self):
    super().__init__()
    self.cv1, self.bn = torch.nn.Conv2d(3, 8, 1), torch.nn.BatchNorm2d(8)
    self.m = torch.nn.ModuleList(torch.nn.Conv2d(4, 4, 3, padding=1) for _ in range(2))
    self.cv2 = torch.nn.Conv2d(16, 6, 1)

  def forward(self, x, augment=False):
    y = list(self.bn(self.cv1(x)).chunk(2, 1))
    y.extend(m(y[-1]) for m in self.m)
    return self.cv2(torch.cat(y, 1))


def test_the_length_of_a_list_of_chunks_and_optional_inputs_past_the_example(tmp_path):
  torch.manual_seed(0)
  verified(SplitBlocks(), (2, 3, 8, 8), "linen")
  text = emitted(SplitBlocks(), np.zeros((2, 3, 8, 8), np.float32), tmp_path)
  assert "INPUT_AXES = [(0, 2, 3, 1)]" in text and not re.search(r"= jnp\.transpose\(", text)
