"""What emitted classes are and what they are named: calls holding other tensor tables or pad
amounts are one class, with fields named for torch's attributes and F.pad's sides; variants are
named for what tells them apart (a shortcut, a setting, a norm's activation, a layer, their
children's names without the model family's words, the Python branch they took); a module some
calls hold where others hold an ``nn.Identity()`` is behind a flag; a list of numbers and a tuple
are one shape; arithmetic the trace took apart is one line with the parentheses it needs; no line
that does nothing, no fx proxy in a message. Parity through the port harness (float64 lock-step
within its 1e-9) where the source's numbers could change."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import jaxbn
from jaxbn._src.port.source import linen as linen_source
from jaxbn._src.torchlike import functional
from parity_tests import port_harness
from parity_tests.port_harness import Case
from parity_tests.test_emit import load_source


def assert_eval_output_is_torchs(path, model, x, api, layout):
  """The emitted source loads strictly (every torch path) and its eval output is torch's within
  float32 rounding (1e-5 relative): for source whose change computes nothing new."""
  loaded = load_source(path, f"emitted_{api}_{layout}_{id(path)}").load()
  x_in = x if layout == "NCHW" else x.transpose(0, 2, 3, 1)
  if api == "linen":
    output = loaded[0].apply(loaded[1], x_in)
  else:
    loaded.eval()
    output = loaded(x_in)
  output = np.asarray(output) if layout == "NCHW" else np.asarray(output).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(output, model(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6)


class TableAttention(torch.nn.Module):
  """timm's levit Attention: heads as an attribute read by a reshape, a learned bias per head and
  position gathered through an index table the module holds outside its state_dict (a
  non-persistent buffer); each resolution its own table."""

  def __init__(self, channels: int, num_heads: int, resolution: int):
    super().__init__()
    self.num_heads, self.key_dim = num_heads, channels // num_heads
    self.qkv, self.bn = torch.nn.Linear(channels, 3 * channels), torch.nn.BatchNorm1d(channels)
    self.attention_biases = torch.nn.Parameter(torch.randn(num_heads, resolution))
    idxs = torch.randint(0, resolution, (resolution, resolution), generator=torch.Generator().manual_seed(resolution))
    self.register_buffer("attention_bias_idxs", idxs, persistent=False)

  def forward(self, x):
    batch, tokens, channels = x.shape
    q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    attention = q @ k.transpose(-2, -1) / self.key_dim**0.5 + self.attention_biases[:, self.attention_bias_idxs]
    x = (attention.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, channels)
    return self.bn(x.transpose(1, 2)).transpose(1, 2)


class TwoTableAttentions(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.first, self.second = TableAttention(8, 2, 16), TableAttention(8, 4, 4)

  def forward(self, x):
    return self.second(self.first(x)[:, :4])


@pytest.mark.parametrize(("api", "layout"), [("linen", "NCHW"), ("nnx", "NHWC")])
def test_calls_holding_other_tables_and_head_counts_are_one_class(api, layout, tmp_path):
  """Two calls of one attention class whose index tables (non-persistent buffers) and head counts
  differ: one class, the table a field holding its key in ``CONSTANTS`` and the head count a field
  named for the torch attribute that holds it (was ``TableAttention1`` with the tables baked in,
  and timm's levit_128s 22 classes, 7 numbered, its reshape sizes ``self.reshape_3``). Through
  the harness (float64 lock-step within its 1e-9)."""
  port_harness.run(Case(TwoTableAttentions, (4, 16, 8), floor=1e-5), via="emit", api=api, layout=layout)
  text = jaxbn.emit(TwoTableAttentions(), torch.zeros(2, 16, 8), tmp_path / "e", api=api, layout=layout).read_text()
  classes = re.findall(r"^class (\w+)\(", text, re.M)
  assert classes[:1] == ["TableAttention"] and "TableAttention1" not in classes, classes
  assert re.search(r"ops\.reshape\(\w+, \w+, \w+, 3, self\.num_heads, -1\)", text), text
  assert "jnp.asarray(CONSTANTS[self.attention_bias_idxs])" in text, text
  assert len(re.findall(r'attention_bias_idxs="int64_16x16_\w+"', text)) == 1, text
  assert len(re.findall(r'attention_bias_idxs="int64_4x4_\w+"', text)) == 1, text


class CheckedSize(torch.nn.Module):
  """timm's efficientvit_m0: an assert whose message forward formats with the input's size."""

  def __init__(self):
    super().__init__()
    self.size, self.bn = 6, torch.nn.BatchNorm2d(4)

  def forward(self, x):
    height = x.shape[-2]
    torch._assert(height == self.size, f"input feature has wrong size, expect {self.size}, got {height}")
    return self.bn(x)


def test_a_message_formatted_while_tracing_shows_no_proxy(tmp_path):
  """fx formats the message with its proxy for the input's height (``got Proxy(getitem_1)``, in
  efficientvit_m0's source 30 times): the source says ``?`` there; the check itself is kept."""
  text = jaxbn.emit(CheckedSize(), np.zeros((2, 4, 6, 6), np.float32), tmp_path / "checked").read_text()
  assert "Proxy(" not in text and "input feature has wrong size, expect 6, got ?" in text, text
  assert re.search(r"\w+ = x\.shape\[-2\] == 6\n", text), text


class SamePadConv(torch.nn.Module):
  """transformers' MobileNetV2ConvLayer: TensorFlow's "same" padding, from the kernel's size: 0 on
  every side for a 1x1 convolution."""

  def __init__(self, kernel: int, activation: bool):
    super().__init__()
    self.conv, self.bn = torch.nn.Conv2d(4, 4, kernel), torch.nn.BatchNorm2d(4)
    self.act = torch.nn.ReLU6() if activation else None

  def forward(self, x):
    total = self.conv.kernel_size[0] - 1
    x = F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2), "constant", 0.0)
    x = self.bn(self.conv(x))
    return x if self.act is None else self.act(x)


class SamePadConvs(torch.nn.Sequential):

  def __init__(self):
    super().__init__(SamePadConv(3, True), SamePadConv(6, True), SamePadConv(1, False))


@pytest.mark.parametrize(("api", "layout"), [("linen", "NCHW"), ("nnx", "NHWC")])
def test_pad_amounts_are_named_for_their_sides_and_a_pad_of_nothing_is_left_out(api, layout, tmp_path):
  """F.pad's amounts that differ between calls are fields named for their sides as torch's
  documentation names them (``pad_left``; was ``pad_pad`` and ``pad_pad_``: transformers'
  MobileNetV2), in torch's layout; a pad of 0 on every side is no line (was ``ops.pad(x, (0, 0, 0,
  0))``). Through the harness (float64 lock-step within its 1e-9)."""
  port_harness.run(Case(SamePadConvs, (4, 4, 6, 6), floor=1e-5), via="emit", api=api, layout=layout)
  text = jaxbn.emit(SamePadConvs(), torch.zeros(2, 4, 6, 6), tmp_path / "e", api=api, layout=layout).read_text()
  assert text.count("ops.pad(") == 1, text  # the 3x3 and 6x6 convolutions' class only
  if layout == "NCHW":
    assert re.search(r"ops\.pad\(\w+, \(self\.pad_left, self\.pad_right, self\.pad_left, self\.pad_right\)", text), text


class ConvNorm(torch.nn.Sequential):

  def __init__(self):
    super().__init__(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4))


class ActivatedConvNorm(torch.nn.Module):

  def __init__(self, activation):
    super().__init__()
    self.conv, self.act = ConvNorm(), activation()

  def forward(self, x):
    return self.act(self.conv(x))


class Residual(torch.nn.Module):

  def __init__(self, inner):
    super().__init__()
    self.inner = inner

  def forward(self, x):
    return x + self.inner(x)


class ResidualsAroundVariants(torch.nn.Sequential):
  """efficientvit_m0's ResidualDrop: around a ConvNorm first, then around each of two variants of
  an attention class."""

  def __init__(self):
    super().__init__(
        Residual(ConvNorm()),
        Residual(ActivatedConvNorm(torch.nn.ReLU)),
        Residual(ActivatedConvNorm(torch.nn.Hardswish)),
    )


def test_variants_around_variants_are_named_for_their_childrens_names(tmp_path):
  """A class first called around a plain child, then around two variants of another class: its
  variants are named once the children's are (was ``ResidualWithActivatedConvNorm1``: the
  children read by their torch class's name, the same for both, as efficientvit_m0's
  ``ResidualDropWithLocalWindowAttention1``)."""
  x = np.zeros((2, 4, 6, 6), np.float32)
  text = jaxbn.emit(ResidualsAroundVariants(), x, tmp_path / "residuals").read_text()
  classes = re.findall(r"^class (\w+)\(", text, re.M)
  assert {c for c in classes if c.startswith("ResidualWithActivated")} == {
      "ResidualWithActivatedConvNormWithRelu",
      "ResidualWithActivatedConvNormWithHardswish",
  }, classes


class IdentityShortcut(torch.nn.Module):
  """timm's byobnet BottleneckBlock: ``shortcut`` an nn.Identity where it adds its input."""

  def __init__(self, skip: bool):
    super().__init__()
    self.conv, self.bn = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
    self.shortcut = torch.nn.Identity() if skip else None

  def forward(self, x):
    y = self.bn(self.conv(x))
    return y if self.shortcut is None else y + self.shortcut(x)


class FirstOrNot(torch.nn.Module):
  """selecsls' blocks: a flag decides what forward does."""

  def __init__(self, is_first: bool):
    super().__init__()
    self.is_first, self.bn = is_first, torch.nn.BatchNorm2d(4)

  def forward(self, x):
    return self.bn(x) if self.is_first else self.bn(x) * x


class Partition(torch.nn.Module):
  """maxvit's partition attention: a string setting decides the order of the axes."""

  def __init__(self, partition: str):
    super().__init__()
    self.partition, self.bn = partition, torch.nn.BatchNorm2d(4)

  def forward(self, x):
    return self.bn(x.transpose(2, 3) if self.partition == "grid" else x)


class GatedNormAct(torch.nn.Module):
  """dpn's CatBnAct: a timm BatchNormAct2d whose activation is the only other difference."""

  def __init__(self, act_layer, gate: bool):
    super().__init__()
    from timm.layers import BatchNormAct2d

    self.gate, self.bn = gate, BatchNormAct2d(4, act_layer=act_layer)

  def forward(self, x):
    return self.bn(x) * x if self.gate else self.bn(x)


class PoolBlock(torch.nn.Module):
  """smp's PSPBlock: its Sequential has a BatchNorm or, over one pixel, an nn.Identity."""

  def __init__(self, batch_norm: bool):
    super().__init__()
    norm = torch.nn.BatchNorm2d(4) if batch_norm else torch.nn.Identity()
    self.pool = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), norm, torch.nn.ReLU())

  def forward(self, x):
    return self.pool(x)


class VariantsOfEveryKind(torch.nn.Sequential):

  def __init__(self):
    super().__init__(
        PoolBlock(False),
        PoolBlock(True),
        IdentityShortcut(True),
        IdentityShortcut(False),
        FirstOrNot(True),
        FirstOrNot(False),
        Partition("grid"),
        Partition("block"),
        GatedNormAct(torch.nn.ReLU, True),
        GatedNormAct(torch.nn.SiLU, False),
    )


class LongNamedDepthwiseSeparableConvolutionNormActLayer(torch.nn.Module):
  """transformers' EfficientNetDepthwiseLayer: pads where it strides."""

  def __init__(self, pad: bool):
    super().__init__()
    self.pad, self.bn = pad, torch.nn.BatchNorm2d(4)

  def forward(self, x):
    return self.bn(F.pad(x, (0, 1, 0, 1))[..., :-1, :-1] if self.pad else x)


class BlockAroundLongNames(torch.nn.Module):

  def __init__(self, pad: bool):
    super().__init__()
    self.conv = LongNamedDepthwiseSeparableConvolutionNormActLayer(pad)

  def forward(self, x):
    return self.conv(x)


def test_variants_whose_childrens_names_run_long_are_named_for_what_tells_the_children_apart(tmp_path):
  """Two calls of a block that differ in their child's variant, whose name with the block's runs
  past 64 characters: the block is named for what tells the children apart (``WithPad``, was
  ``BlockAroundLongNames1``, as transformers' ``EfficientNetBlock1`` and ``2``)."""
  model = torch.nn.Sequential(BlockAroundLongNames(True), BlockAroundLongNames(False))
  text = jaxbn.emit(model, np.zeros((2, 4, 6, 6), np.float32), tmp_path / "long").read_text()
  classes = re.findall(r"^class (\w+)\(", text, re.M)
  assert {c for c in classes if c.startswith("BlockAround")} == {
      "BlockAroundLongNamesWithPad",
      "BlockAroundLongNames",
  }, classes


def test_variants_are_named_for_a_shortcut_a_setting_their_norms_activation_or_their_layers(tmp_path):
  """What tells variants apart where their code's attributes do not: adding their input through an
  nn.Identity (``WithSkip``, was mobilevit_xxs' ``BottleneckBlock1``), a flag or a short string of
  their torch modules (``IsFirst``, ``Grid``; was selecsls' ``SelecSlsBlock1``), their norm's
  activation (``WithRelu``; was dpn's ``CatBnAct1``), the layers of their Sequential
  (``WithBatchNorm``; was smp's ``PSPBlock1``); no class is numbered."""
  x = np.zeros((2, 4, 6, 6), np.float32)
  text = jaxbn.emit(VariantsOfEveryKind(), x, tmp_path / "variants").read_text()
  assert re.findall(r"^class (\w+)\(", text, re.M) == [
      "PoolBlock",
      "PoolBlockWithBatchNorm",
      "IdentityShortcutWithSkip",
      "IdentityShortcut",
      "FirstOrNotIsFirst",
      "FirstOrNot",
      "PartitionGrid",
      "PartitionBlock",
      "GatedNormActWithRelu",
      "GatedNormActWithSilu",
      "VariantsOfEveryKind",
  ], text


class KernelConvNorm(torch.nn.Module):

  def __init__(self, kernel_size, padding):
    super().__init__()
    self.conv = torch.nn.Conv2d(4, 4, kernel_size, padding=padding, bias=False)
    self.bn = torch.nn.BatchNorm2d(4)

  def forward(self, x):
    return self.bn(self.conv(x))


class FactorisedConvs(torch.nn.Module):
  """inception's convolutions: a square kernel given as an int, a factorised one as a tuple."""

  def __init__(self):
    super().__init__()
    self.square, self.wide = KernelConvNorm(3, 1), KernelConvNorm((1, 3), (0, 1))

  def forward(self, x):
    return self.wide(self.square(x))


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_a_field_given_an_int_in_one_call_and_a_tuple_in_another_is_annotated_with_both(api, tmp_path):
  """A kernel size that is 3 in one call and (1, 3) in another is ``int | tuple`` (was ``Any``, as
  in every inception's and mc3_18's source); the class body evaluates it."""
  path = jaxbn.emit(FactorisedConvs(), np.zeros((2, 4, 6, 6), np.float32), tmp_path / "e", api=api)
  text = path.read_text()
  annotations = dict(re.findall(r"\b(conv_kernel_size|conv_padding): ([\w |]+?)(?:,|$)", text, re.M))
  # NNX's Conv takes the kernel size as a tuple (torch's 3 is written (3, 3))
  kernel_size = "int | tuple" if api == "linen" else "tuple"
  assert annotations == {"conv_kernel_size": kernel_size, "conv_padding": "int | tuple"}, text
  assert "Any" not in text, text
  load_source(path, f"factorised_{api}")


class PlaceholderHeads(torch.nn.Module):
  """smp's heads: identity placeholders (no upsampling, no activation) after a convolution, one
  before a function, and one before a layer, whose path counts it."""

  def __init__(self):
    super().__init__()
    identity = torch.nn.Identity
    self.head = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), identity(), identity())
    self.pool = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), identity(), torch.nn.ReLU())
    self.kept = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), identity(), torch.nn.BatchNorm2d(4))

  def forward(self, x):
    return self.kept(self.pool(self.head(x)))


@pytest.mark.parametrize(("api", "layout"), [("linen", "NCHW"), ("nnx", "NHWC")])
def test_identities_no_later_layer_counts_are_left_out_of_a_sequential(api, layout, tmp_path):
  """A Sequential's ``nn.Identity()`` placeholders after its last layer are no element (was
  ``ops.identity, ops.identity`` in every smp model's segmentation head); one before a layer stays,
  as the layer's path is its index. A strict load (every torch path) and the eval output as
  torch's, within float32 rounding (1e-5 relative): the placeholders compute nothing."""
  torch.manual_seed(0)
  model = PlaceholderHeads()
  model(torch.randn(8, 4, 6, 6))  # running statistics a trained layer would hold
  x = np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype(np.float32)
  path = jaxbn.emit(model.eval(), x, tmp_path / "e", api=api, layout=layout)
  assert_eval_output_is_torchs(path, model, x, api, layout)
  text = path.read_text()
  assert text.count("ops.identity") == 1 and re.search(r"ops\.identity,\s+jaxbn\.(nnx\.)?BatchNorm\(", text), text
  assert text.count("Sequential(") == 3 and re.search(r"\), ops\.relu[\])]", text), text


class SamePaddingConv(torch.nn.Conv2d):
  """efficientnet_pytorch's Conv2dStaticSamePadding (smp's efficientnet encoders): its stride a
  list where it is 2, torch's tuple where it is 1, passed to F.conv2d; its dilation a list or a tuple
  with it, passed by keyword."""

  def __init__(self, inputs: int, outputs: int, stride: int):
    super().__init__(inputs, outputs, 3, stride=stride, dilation=3 - stride)
    self.stride = self.stride if stride == 1 else [self.stride[0]] * 2
    self.dilation = self.dilation if stride == 1 else [self.dilation[0]] * 2  # 1 here, 2 in the other

  def forward(self, x):
    return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, dilation=self.dilation, groups=self.groups)


class ListAndTupleStrides(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.first, self.second, self.bn = SamePaddingConv(3, 4, 1), SamePaddingConv(4, 4, 2), torch.nn.BatchNorm2d(4)

  def forward(self, x):
    return self.bn(self.second(self.first(x)))


@pytest.mark.parametrize(("api", "layout"), [("linen", "NCHW"), ("nnx", "NCHW")])  # F.conv2d: NCHW in both
def test_a_size_given_as_a_list_in_one_call_and_a_tuple_in_another_is_one_class(api, layout, tmp_path):
  """torch's ``int[]`` arguments take a list or a tuple, by position or by keyword: calls that
  differ only in which are one class, the stride and dilation fields (was ``SamePaddingConv`` and
  ``SamePaddingConv1``)."""
  torch.manual_seed(0)
  model = ListAndTupleStrides().eval()
  x = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)
  path = jaxbn.emit(model, x, tmp_path / "e", api=api, layout=layout)
  text = path.read_text()
  assert re.findall(r"^class (\w+)\(", text, re.M) == ["SamePaddingConv", "ListAndTupleStrides"], text
  assert "(self.conv_stride, self.conv_stride)" in text, text
  assert re.search(r"dilation=\(self\.\w*dilation\w*, self\.\w*dilation\w*\)", text), text
  assert_eval_output_is_torchs(path, model, x, api, layout)


class ChannelsFirstLayerNorm(torch.nn.LayerNorm):
  """smp's mit LayerNorm: channels-first images through their channels, tokens as they are."""

  def forward(self, x):
    if x.ndim == 4:
      batch, channels, height, width = x.shape
      x = super().forward(x.view(batch, channels, -1).transpose(1, 2))
      return x.transpose(1, 2).view(batch, channels, height, width)
    return super().forward(x)


class ImagesAndTokens(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.image_norm, self.token_norm, self.bn = (
        ChannelsFirstLayerNorm(4),
        ChannelsFirstLayerNorm(6),
        torch.nn.BatchNorm1d(4),
    )

  def forward(self, x):
    return self.bn(self.token_norm(self.image_norm(x).flatten(2)))


def test_variants_that_took_other_python_branches_are_named_for_them(tmp_path):
  """Variants whose code differs where torch's line branches on one comparison are named for the
  branch each took (was ``ChannelsFirstLayerNorm`` and ``ChannelsFirstLayerNorm1``); the source
  loads strictly and computes torch's eval output."""
  torch.manual_seed(0)
  model = ImagesAndTokens().eval()
  x = np.random.default_rng(0).standard_normal((2, 4, 2, 3)).astype(np.float32)
  path = jaxbn.emit(model, x, tmp_path / "e")
  names = re.findall(r"^class (\w+)\(", path.read_text(), re.M)
  assert names == ["ChannelsFirstLayerNormIfNdimIs4", "ChannelsFirstLayerNormIfNdimIsNot4", "ImagesAndTokens"], names
  assert_eval_output_is_torchs(path, model, x, "linen", "NCHW")


def test_a_branch_is_named_only_for_one_comparison_of_a_name_with_a_number():
  """``if x.ndim == 4:``, ``elif h > 7:``, ``if padding:`` name the branch taken; a line with more
  than one condition, or a comparison with no number, names none (numbered, as before)."""
  guard = jaxbn._src.port.tracer.Guard
  branch = jaxbn._src.port.source.naming._branch
  taken = {
      ("bool", True, "m.py:3: if x.ndim == 4:"): "IfNdimIs4",
      ("bool", False, "m.py:3: if x.ndim == 4:"): "IfNdimIsNot4",
      ("bool", True, "m.py:3: elif h > 7:"): "IfHAbove7",
      ("bool", False, "m.py:3: elif h > 7:"): "IfHAtMost7",
      ("bool", False, "m.py:3: if self.pad_h <= -1:"): "IfPadHAboveMinus1",
      ("bool", True, "m.py:3: if padding:"): "IfPadding",
      ("bool", False, "m.py:3: if padding:"): "IfNotPadding",
      ("bool", True, "m.py:3: if h > 7 and w > 7:"): None,
      ("bool", True, "m.py:3: if x.shape == y.shape:"): None,
      ("bool", True, "m.py:3: y = x if h > 7 else z"): None,
      ("int", 3, "m.py:3: if x.ndim == 4:"): None,
  }
  assert {key: branch(guard(*key)) for key in taken} == taken


def test_a_child_is_named_without_the_model_familys_words_its_caller_shares():
  """A child class named with the words its caller's name begins with too (a model family's
  prefix) gives a part without them: HGNetV2Stage calling HGNetV2BasicLayer is
  ``HGNetV2StageWithBasicLayer`` (was ``HGNetV2StageWithHGNetV2BasicLayer``). A word starts at an
  upper-case letter after a lower-case one or a digit, or before a lower-case one (RepVGG, VGG
  Stage); a name that extends the other whole keeps all its words."""
  unshared = jaxbn._src.port.source.naming._unshared
  parts = {
      ("HGNetV2Stage", "HGNetV2BasicLayer"): "BasicLayer",
      ("PPLCNetV3Block", "PPLCNetV3DepthwiseSeparableConvLayer"): "DepthwiseSeparableConvLayer",
      ("LevitResidualLayer", "LevitAttention"): "Attention",
      ("UVDocResNetStage", "UVDocResidualBlock"): "ResidualBlock",  # Res is no word of ResNet
      ("EfficientLoFTRRepVGGStage", "EfficientLoFTRRepVGGBlock"): "Block",  # VGG and Stage: two words
      ("PPLCNetV3Block", "PPOCRV6SmallDetNeck"): "PPOCRV6SmallDetNeck",  # PP is no word
      ("ConvNorm", "ConvNormAct"): "ConvNormAct",
      ("Bottleneck", "SqueezeExcite"): "SqueezeExcite",
  }
  assert {key: unshared(*key) for key in parts} == parts


class MaybePadded(torch.nn.Module):
  """transformers' EfficientNetDepthwiseLayer: pads where it strides."""

  def __init__(self, pad: bool):
    super().__init__()
    self.pad, self.bn = pad, torch.nn.BatchNorm2d(4)

  def forward(self, x):
    return self.bn(F.pad(x, (1, 1, 1, 1))[..., 1:-1, 1:-1] if self.pad else x)


class MaybeSkipped(torch.nn.Module):
  """transformers' EfficientNetFinalBlockLayer: adds the block's input where it has a skip."""

  def __init__(self, skip: bool):
    super().__init__()
    self.skip, self.bn = skip, torch.nn.BatchNorm2d(4)

  def forward(self, x, inputs):
    return self.bn(x) + inputs if self.skip else self.bn(x)


class PaddedOrSkipped(torch.nn.Module):
  """transformers' EfficientNetBlock: its variants differ only by their children's variants."""

  def __init__(self, pad: bool, skip: bool):
    super().__init__()
    self.depthwise, self.projection = MaybePadded(pad), MaybeSkipped(skip)

  def forward(self, x):
    return self.projection(self.depthwise(x), x)


def test_a_child_that_keeps_its_classs_name_names_no_variant(tmp_path):
  """Variants that differ by the variants of the children they call: the one calling the plain
  children keeps torch's name (was ``PaddedOrSkippedWithMaybePaddedWithMaybeSkipped``, as
  transformers' ``EfficientNetBlockWithDepthwiseLayerWithFinalBlockLayer``), the others are named
  for the children that differ."""
  model = torch.nn.Sequential(PaddedOrSkipped(True, False), PaddedOrSkipped(False, True), PaddedOrSkipped(False, False))
  text = jaxbn.emit(model, np.zeros((2, 4, 6, 6), np.float32), tmp_path / "blocks").read_text()
  classes = re.findall(r"^class (PaddedOrSkipped\w*)\(", text, re.M)
  assert sorted(classes) == sorted(
      ["PaddedOrSkipped", "PaddedOrSkippedWithMaybePaddedWithPad", "PaddedOrSkippedWithMaybeSkippedWithSkipWith2Inputs"]
  ), text


def test_a_long_name_keeps_a_part_that_tells_it_from_what_every_other_variant_has():
  """transformers' PPLCNetV3DepthwiseSeparableConvLayer: three variants, ``plain`` (named first,
  for nothing: its children's names were never needed) calls ``RepWithIdentity`` and
  ``RepWithAct``; ``small`` calls ``RepWithSmall`` and ``RepWithAct``; ``identity`` calls
  ``RepWithIdentity`` twice. ``small``'s name runs long and keeps one part: ``WithRepWithSmall``,
  which no other has, not ``WithRepWithAct``, which ``plain`` has too (was chosen, as ``plain``'s
  name lists no child; the name said what it shares)."""
  shortest = jaxbn._src.port.source.naming._shortest
  base = "PPLCNetV3DepthwiseSeparableConvLayer"
  parts = {
      "plain": [],
      "small": ["WithSqueezeExcitationModule", "WithRepWithAct", "WithRepWithSmall"],
      "identity": ["WithSqueezeExcitationModule", "WithRepWithIdentity"],
  }
  every = {
      "plain": {"WithRepWithIdentity", "WithRepWithAct"},
      "small": {"WithRepWithSmall", "WithRepWithAct"},
      "identity": {"WithRepWithIdentity"},
  }
  assert shortest(base, parts, every)["small"] == base + "WithRepWithSmall"
  assert shortest(base, parts)["small"] == base + "WithRepWithAct"  # what ``every`` mends


class ShapeItems(torch.nn.Module):
  """Sizes and tensors unpacked as torch code does: ``B, C, H, W = x.shape``, an item not read
  (``b, _, w = ...shape[:3]``), ``q, k, v = qkv.unbind(1)``, ``height, width = x.shape[-2:]``,
  ``_, _, h, w = x.shape``."""

  def __init__(self):
    super().__init__()
    self.bn, self.qkv = torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 12, 1)

  def forward(self, x):
    B, C, H, W = x.shape
    b, _, w = self.bn(x).shape[:3]
    q, k, v = self.qkv(x).reshape(B, 3, C, H * W).unbind(1)
    height, width = x.shape[-2:]
    _, _, h, w2 = x.shape
    return (q * k + v).reshape(b, C, H, w) * height / width + h * w2


@pytest.mark.parametrize(("api", "layout"), [("linen", "NCHW"), ("nnx", "NHWC")])
def test_items_taken_in_turn_are_one_unpacking(api, layout, tmp_path):
  """Consecutive lines that take items of one value (torch's trace of ``B, C, H, W = x.shape``)
  are one line, ``y, y1, y2, y3 = x.shape[:4]`` (was five: ``y = x.shape``, ``y1 = y[0]``, ...);
  channels-last takes torch's sizes in its own order; a slice of as many items needs no second
  slice. Through the harness (float64 lock-step within its 1e-9)."""
  port_harness.run(Case(ShapeItems, (2, 4, 6, 6), floor=1e-5), via="emit", api=api, layout=layout)
  text = jaxbn.emit(ShapeItems(), np.zeros((2, 4, 6, 6), np.float32), tmp_path / "e", api=api, layout=layout)
  body = text.read_text().split("def __call__")[1].split("return")[0]
  unpacked = re.findall(r"^\s+(\w+(?:, \w+)+) = (.*)$", body, re.M)
  assert [len(targets.split(", ")) for targets, _ in unpacked] == [4, 3, 3, 2, 2], body
  assert unpacked[0][1] == "x.shape[:4]" and unpacked[1][0].split(", ")[1] == "_", body
  assert unpacked[2][1].startswith("ops.unbind(") and unpacked[2][1].endswith(")[:3]"), body
  assert unpacked[3][1] == ("x.shape[-2:]" if layout == "NCHW" else "x.shape[1:3]"), body
  assert unpacked[4][1] == ("x.shape[2:4]" if layout == "NCHW" else "x.shape[1:3]"), body  # _, _, h, w
  assert not re.search(r"\w\[\d+\]$", body, re.M), body  # no item taken on a line of its own


class PadIfNeeded(torch.nn.Module):
  """timm's ``if pad_h or pad_w:`` and tiny_vit's ``padding = pad_b > 0; if padding:``."""

  def forward(self, x):
    pad = -x.shape[-1] % 4
    if pad:
      x = F.pad(x, (0, pad))
    padding = x.shape[-2] > 2
    if padding:
      x = x * 2
    if padding:
      x = x + 1
    return x


def test_a_truth_the_trace_took_is_asserted_as_torch_tests_it(tmp_path):
  """``assert not y`` and ``assert y`` (was ``assert bool(y) == False``); a size read once is taken
  where it is read, and torch's arithmetic on it is one line (``y = -x.shape[-1] % 4``, was
  ``y = x.shape``, ``y = y[-1]``, ``y = -y``, ``y = y % 4``); the source runs."""
  path = jaxbn.emit(PadIfNeeded(), np.zeros((2, 3, 4, 8), np.float32), tmp_path / "e")
  text = path.read_text()
  asserts = re.findall(r"^\s+assert (.*), \"specialised to the example input\"$", text, re.M)
  assert [re.sub(r"y\d*", "y", a) for a in asserts] == ["not y", "y", "y"], text
  assert re.findall(r"^\s+\w+ = (.*x\.shape.*)$", text, re.M) == ["-x.shape[-1] % 4", "x.shape[-2] > 2"], text
  module, variables = load_source(path, "pad_if_needed").load()
  np.testing.assert_array_equal(module.apply(variables, np.ones((2, 3, 4, 8), np.float32)), 3)


class Arithmetic(torch.nn.Module):
  """timm's same padding, and arithmetic whose order Python's precedence alone cannot write."""

  def __init__(self):
    super().__init__()
    self.bn = torch.nn.BatchNorm2d(3)

  def forward(self, x):
    height, width = x.shape[-2:]
    pad = (-(height // -2) - 1) * 2 + 3 - width
    x = self.bn(x).abs() + 1
    a = x - (x * 0.5 - pad)
    b = -((a - 1) ** 2)
    c = (b**2) ** 0.5 + a**x**0.5
    return c * ((c > 1) == (a < 2)) + b


def test_arithmetic_the_trace_took_apart_is_one_line_with_the_parentheses_it_needs(tmp_path):
  """Arithmetic torch writes as one expression and its trace records one operation a line is one
  line again (timm's same padding: ``(-(y // -2) - 1) * 2 + 3 - y1``, was six lines), with the
  parentheses Python needs to compute the trace's operations in their order and no others; the
  eval output is torch's (1e-5 relative)."""
  torch.manual_seed(0)
  model = Arithmetic()
  model(torch.randn(8, 3, 5, 7))  # running statistics a trained layer would hold
  x = np.random.default_rng(0).standard_normal((2, 3, 5, 7)).astype(np.float32)
  path = jaxbn.emit(model.eval(), x, tmp_path / "e")
  body = path.read_text().split("def __call__")[1].split("\nEXAMPLE_INPUTS")[0]
  for written in (  # as the source's formatter lays them out (``a**b`` where both are names)
      r"= \(-\(y // -2\) - 1\) \* 2 \+ 3 - y1$",  # a size's arithmetic, torch's line
      r"= x - \(x \* 0\.5 - y\)$",  # a - (b - c): the same binding on the right
      r"= -\(\(\w+ - 1\) \*\* 2\)$",  # -(x - 1) ** 2 (the formatter's outer parentheses)
      r"= \(\w+\*\*2\) \*\* 0\.5$",  # ** binds right to left
      r"= \w+ \+ \w+\*\*x\*\*0\.5$",
      r"= \w+ \* \(\w+ == \(\w+ < 2\)\) \+ \w+$",  # Python chains comparisons
  ):
    assert re.search(written, body, re.M), (written, body)
  assert_eval_output_is_torchs(path, model, x, "linen", "NCHW")


def _constant(value: int) -> tuple:
  return ("const", value, "c", None)


def _applied(symbol: str, *operands) -> tuple:
  table = linen_source.PREFIX if len(operands) == 1 else linen_source.INFIX
  return ("op", functional.OpRule(next(fn for fn, written in table.items() if written == symbol)), operands, ())


def _computed(e: tuple):
  """The expression's value, each operation applied to its operands' values: the trace's order."""
  if e[0] == "const":
    return e[1]
  values = [_computed(operand) for operand in e[2]]
  symbol = linen_source.PREFIX.get(e[1].fn) or linen_source.INFIX[e[1].fn]
  return eval(f"{symbol}a" if len(values) == 1 else f"a {symbol} b", dict(zip("ab", values, strict=False)))


BINARY = ("+", "-", "*", "//", "%", "**", "<", "==", "|", "&")
EXPRESSIONS = st.recursive(
    st.integers(-3, 3).map(_constant),
    lambda operands: st.one_of(
        st.builds(_applied, st.sampled_from(BINARY), operands, operands), st.builds(_applied, st.just("-"), operands)
    ),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(EXPRESSIONS)
def test_an_expression_is_written_with_the_parentheses_that_keep_its_order(expression):
  """Any nesting of Python's operators over numbers (negative ones too), as the source writes it,
  computes what its operations compute in their order (``_folded``'s lines)."""
  try:
    expected = _computed(expression)
  except (ZeroDivisionError, OverflowError, TypeError):  # x // 0, 3.0 ** 999, 1 | 0.5: no value
    assume(False)
  body = linen_source.Body.__new__(linen_source.Body)
  body.fields, body.names, body.source = {}, {}, None
  written = body.expression(expression)
  assert eval(written) == expected, written  # Python reads the source as it will in the file


class Tree(torch.nn.Module):
  """timm's DlaTree: a tree holds a tree (or a leaf norm); its variants differ in the variant of
  the tree they hold."""

  def __init__(self, depth: int, project: bool):
    super().__init__()
    self.project = torch.nn.Conv2d(4, 4, 1) if project and depth == 1 else None
    self.tree = Tree(depth - 1, project) if depth > 1 else torch.nn.BatchNorm2d(4)

  def forward(self, x):
    return self.tree(x if self.project is None else self.project(x))


def test_variants_holding_variants_of_their_own_class_are_named_for_them(tmp_path):
  """Trees of trees that differ only in the tree they hold are named for its name once it has
  one (was ``TreeWithTree1``, as timm dla46x_c's ``DlaTreeWithDownsample1``: the held trees read
  by their torch class's name, the same for both, while their own group was being named)."""
  model = torch.nn.Sequential(Tree(2, True), Tree(2, False), Tree(1, False))
  text = jaxbn.emit(model, np.zeros((2, 4, 6, 6), np.float32), tmp_path / "trees").read_text()
  assert set(re.findall(r"^class (Tree\w*)\(", text, re.M)) == {
      "TreeWithProject",
      "Tree",
      "TreeWithTreeWithProject",
      "TreeWithTree",
  }, text


class Attention(torch.nn.Module):
  """smp's ``Attention(None)``: a placeholder (its nn.Identity returns its input), which the
  source leaves out."""

  def __init__(self):
    super().__init__()
    self.attention = torch.nn.Identity()

  def forward(self, x):
    return self.attention(x)


class _Gate(torch.nn.Module):
  """smp mix_transformer's Attention: another library's class of the same name, which the source
  writes."""

  def __init__(self):
    super().__init__()
    self.bn = torch.nn.BatchNorm2d(8)

  def forward(self, x):
    return x * torch.sigmoid(self.bn(x))


_Gate.__name__ = "Attention"


class DecoderBlock(torch.nn.Module):
  """smp's UnetDecoderBlock: ``attention1`` (a placeholder) runs only where a skip is concatenated."""

  def __init__(self):
    super().__init__()
    self.attention1, self.gate = Attention(), _Gate()

  def forward(self, x, skip=None):
    if skip is not None:
      x = self.attention1(torch.cat([x, -skip], dim=1))
    return self.gate(x)


class Decoder(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.first, self.second = DecoderBlock(), DecoderBlock()

  def forward(self, x):
    return self.second(self.first(x, torch.relu(x)))


def test_a_class_the_source_leaves_out_takes_no_name_and_names_nothing(tmp_path):
  """A placeholder class (it returns its input: no class in the source) named ``Attention`` beside
  a written class of that name: the written one keeps it (was ``Attention1``, smp mit_b0's), and
  the placeholder's attribute names no variant (was ``DecoderBlockWithAttention1``)."""
  text = jaxbn.emit(Decoder(), np.zeros((2, 4, 6, 6), np.float32), tmp_path / "decoder").read_text()
  classes = re.findall(r"^class (\w+)\(", text, re.M)
  assert classes == ["Attention", "DecoderBlock", "DecoderBlockWith1Inputs", "Decoder"], text


class RepBranches(torch.nn.Module):
  """transformers' TextNetRepConvLayer (a RepVGG layer): a main convolution, and a vertical, a
  horizontal and an identity branch, each added where the layer has it."""

  def __init__(self, vertical: bool, horizontal: bool, identity: bool):
    super().__init__()
    self.main_conv, self.main_bn = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4)
    self.vertical_conv = torch.nn.Conv2d(4, 4, (3, 1), padding=(1, 0), bias=False) if vertical else None
    self.vertical_bn = torch.nn.BatchNorm2d(4) if vertical else None
    self.horizontal_conv = torch.nn.Conv2d(4, 4, (1, 3), padding=(0, 1), bias=False) if horizontal else None
    self.horizontal_bn = torch.nn.BatchNorm2d(4) if horizontal else None
    self.identity = torch.nn.BatchNorm2d(4) if identity else None
    self.drop_path = torch.nn.Identity()  # timm's DropPath at rate 0

  def forward(self, x):
    y = self.main_bn(self.main_conv(x))
    if self.vertical_conv is not None:
      y = y + self.vertical_bn(self.vertical_conv(x))
    if self.horizontal_conv is not None:
      y = y + self.horizontal_bn(self.horizontal_conv(x))
    if self.identity is not None:
      y = y + self.drop_path(self.identity(x))
    return torch.relu(y)


class RepStage(torch.nn.Module):
  """TextNet's TextNetStage: RepBranches layers in a Sequential."""

  def __init__(self, *branches: tuple[bool, bool, bool]):
    super().__init__()
    self.stage = torch.nn.Sequential(*(RepBranches(*b) for b in branches))

  def forward(self, x):
    return self.stage(x)


class RepStages(torch.nn.Sequential):
  """Two stages whose layers have different branches: TextNet's encoder."""

  def __init__(self):
    super().__init__(
        RepStage((True, True, True), (True, True, False)), RepStage((True, False, True), (False, True, True))
    )


@pytest.mark.parametrize(("api", "layout"), [("linen", "NCHW"), ("nnx", "NHWC")])
def test_layers_that_add_other_branches_are_one_class_with_a_flag_per_branch(api, layout, tmp_path):
  """A RepVGG layer whose calls add different branches to their main one (a convolution and its
  norm, or a norm alone) is one class, each branch behind a flag (was four classes,
  ``TextNetRepConvLayerWithHorizontalBatchNormWithRbrIdentity`` .., and the stages above them
  numbered: ``TextNetStage1``, ``TextNetStage2``), without the branches' identities (a DropPath at
  rate 0); the stages are one class whose calls set the flags, each from a field of its own name. Through the harness (float64 lock-step within its 1e-9).
  """
  port_harness.run(Case(RepStages, (4, 4, 6, 6), floor=1e-5), via="emit", api=api, layout=layout)
  text = jaxbn.emit(RepStages(), torch.zeros(2, 4, 6, 6), tmp_path / "e", api=api, layout=layout).read_text()
  assert re.findall(r"^class (\w+)\(", text, re.M) == ["RepBranches", "RepStage", "RepStages"], text
  for flag in ("with_vertical_conv", "with_horizontal_conv", "with_identity"):
    assert f"{flag}: bool = False" in text or api == "nnx", text
    assert re.search(rf"(self\.{flag}|self\.{flag.removeprefix('with_')} is not None):\n", text), (flag, text)
  assert "identity(" not in text.replace("self.identity(", ""), text  # no line that does nothing in a branch
  # a flag is set from a field of its own name: flags equal by chance share none
  passed = re.findall(r"\b(with_\w+)=(?:self\.)?\w*?(with_\w+)\b", text)
  assert passed and all(flag == field for flag, field in passed), passed


class SqueezeExcite(torch.nn.Module):

  def __init__(self, channels: int):
    super().__init__()
    self.reduce, self.expand = torch.nn.Conv2d(channels, 2, 1), torch.nn.Conv2d(2, channels, 1)

  def forward(self, x):
    return x * torch.sigmoid(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


class MaybeExcited(torch.nn.Module):
  """transformers' PPLCNetV3DepthwiseSeparableConvLayer, timm's blocks: a module or, where the
  block has none, an ``nn.Identity()`` placeholder in its place."""

  def __init__(self, channels: int, use_se: bool):
    super().__init__()
    self.conv, self.bn = torch.nn.Conv2d(4, channels, 3, padding=1), torch.nn.BatchNorm2d(channels)
    self.se = SqueezeExcite(channels) if use_se else torch.nn.Identity()

  def forward(self, x):
    return self.bn(self.se(self.conv(x)))


class ExcitedAndNot(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.plain, self.excited = MaybeExcited(4, use_se=False), MaybeExcited(4, use_se=True)

  def forward(self, x):
    return self.excited(self.plain(x))


@pytest.mark.parametrize(("api", "layout"), [("linen", "NCHW"), ("nnx", "NHWC")])
def test_a_module_or_its_placeholder_is_one_class_with_a_flag(api, layout, tmp_path):
  """A block holding a module where others hold an ``nn.Identity()`` in its place is one class, the
  module behind a flag (was ``MaybeExcited`` and ``MaybeExcitedWithSe``: the source writes no line
  for the placeholder, so the two differed only by the module); it loads strictly and its eval
  output is torch's."""
  model = ExcitedAndNot().eval()
  x = np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype(np.float32)
  path = jaxbn.emit(model, x, tmp_path / "e", api=api, layout=layout)
  text = path.read_text()
  assert re.findall(r"^class (\w+)\(", text, re.M) == ["SqueezeExcite", "MaybeExcited", "ExcitedAndNot"], text
  assert re.search(r"if self\.(with_se|se is not None):\n", text), text
  assert "identity(" not in text, text
  assert_eval_output_is_torchs(path, model, x, api, layout)
