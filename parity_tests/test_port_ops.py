"""Each op and module of the port's tables against torch, on the cases where torch's rules are
particular: pooling windows in ceil mode and with padding excluded from the count, adaptive bins
that do not divide, nearest and bilinear interpolation, conv padding modes and strings, grouped
and dilated transposed convolution, uneven chunk and split.

All in float64 (torch's module in double, ``jaxbn.port(..., dtype=float64)``), so that the
tolerance, 1e-12 relative to the largest |output|, measures the rules and not float32 summation
order. Pooling, indexing and shapes come out exact.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jaxbn
from parity_tests import port_harness

RTOL = 1e-12


class Functional(nn.Module):
  """Shape and arithmetic ops as a model's forward uses them."""

  def forward(self, x):
    n, c, h, w = x.size()
    a, b, rest = torch.split(x, [1, 2, c - 3], dim=1)
    chunks = x.chunk(3, dim=3)  # 7 columns -> 3, 3, 1 (torch's rule)
    y = torch.cat([a * 2 - b[:, :1], rest.relu(), chunks[-1][:, :1, :, 0].unsqueeze(-1).expand(n, 1, h, w)], dim=1)
    y = y.permute(0, 2, 3, 1).contiguous().view(n, -1, y.shape[1]).transpose(1, 2)
    z = torch.stack([y.sum(-1), y.amax(-1), y.mean(dim=2, keepdim=True).squeeze(2)], dim=1)
    z = F.pad(z, (1, 2), mode="reflect").clamp(-1.5, 1.5) / 3 + x.flatten(1)[:, :1, None].neg() ** 2
    return z.reshape(n, -1), F.softmax(z, dim=-1), torch.square(z) + z.abs().square()


class Attention(nn.Module):
  """F.scaled_dot_product_attention on (N, heads, L, E) slices of the input, with torch's options."""

  def __init__(self, causal=False, scale=None, kv_heads=4, mask=None):
    super().__init__()
    self.causal, self.scale, self.kv_heads, self.mask = causal, scale, kv_heads, mask

  def forward(self, x):
    q, k, v = x, (x * 0.5)[:, : self.kv_heads], (x * x - 1)[:, : self.kv_heads]
    mask = None
    if self.mask == "bool":
      mask = torch.ones(6, 6, dtype=torch.bool).triu(-1)
    elif self.mask == "float":
      mask = x[0, 0, :, :6] * 0.3  # (L, S) additive
    if self.mask == "windows":  # Tensor.unfold's sliding windows (timm's halo attention)
      return x.unfold(2, 3, 2).unfold(-2, 4, 3)  # (2, 4, 2, 2, 3, 4)
    return F.scaled_dot_product_attention(
        q,
        k.reshape_as(v),
        v,
        attn_mask=mask,
        is_causal=self.causal,
        scale=self.scale,
        enable_gqa=self.kv_heads != 4,
    )


class FunctionalNorms(nn.Module):
  """timm's LayerNorm2d and GroupNorm: F.layer_norm and F.group_norm with the module's own
  weights (read in forward); torch.unbind and Tensor.unbind; F.normalize (swiftformer)."""

  def __init__(self, channels=6):
    super().__init__()
    self.weight, self.bias, self.group_weight = (nn.Parameter(torch.randn(channels)) for _ in range(3))

  def forward(self, x):
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, 1e-6).permute(0, 3, 1, 2)
    z = F.group_norm(x, 3, self.group_weight, None, 1e-5)
    first, second = torch.unbind(y[:, :2], dim=1)
    return y + z, first * second.unbind(0)[0], F.normalize(x, dim=-1), F.normalize(x, p=1.0, dim=1, eps=0.5)


class Encodings(nn.Module):
  """xcit's Fourier position encoding and friends: arange, repeat, sin / cos, floor division,
  dtype casts through .dtype, .float() and .to(), max / min with and without dim, einsum
  and swapaxes (maxvit's attention)."""

  def forward(self, x):
    n, c, h, w = x.shape
    rows = torch.arange(1, h + 1).to(x.dtype).unsqueeze(1).repeat(1, w)  # (h, w)
    periods = 100 ** (2 * torch.div(torch.arange(c), 2, rounding_mode="floor").to(x.dtype) / c)
    pos = (rows[None] / periods.to(x.dtype)[:, None, None]).sin() + rows.cos() + torch.arange(0.5, 2.5, 0.5)[:1]
    values, indices = x.max(1)
    rounded = x.float().to(x.dtype) + x.type_as(rows)  # float32 rounding in both
    pairs = torch.einsum("nchw,nchv->ncwv", x, x) + torch.einsum("ncij,ncij->ncij", [x, x]).sum(2, keepdim=True)
    return (
        (rounded + pos).repeat(1, 2, 1, 1),
        values,
        x.min(),
        torch.max(x, x * 0.5),
        indices.to(x.dtype),
        torch.arange(5) / 2,
        torch.swapaxes(pairs, 2, 3),
    )


class Anchors(nn.Module):
  """ultralytics' make_anchors (its Detect head's anchor points and strides): arange in the input's
  dtype, meshgrid, stack, Tensor.new_full / new_zeros / new_ones, cat; torch.zeros / ones / full /
  empty with sizes from the input's shape; torch.tensor of sizes, tril / triu, amin; cumsum
  (transformers' EfficientLoFTR: rotary positions as cumulative sums of ones, and of a mask),
  repeat_interleave."""

  def forward(self, x):
    points, strides = [], []
    for stride in (8, 16):
      _, _, h, w = x[..., :: stride // 8, :: stride // 8].shape
      sx = torch.arange(end=w, dtype=x.dtype) + 0.5  # ultralytics: arange(end=w)
      sy, sx = torch.meshgrid(torch.arange(h, dtype=x.dtype) + 0.5, sx, indexing="ij")
      points.append(torch.stack((sx, sy), -1).view(-1, 2))
      strides.append(x.new_full((h * w, 1), stride, dtype=x.dtype))
    n, c, h, w = x.shape
    dummy = torch.empty([n, 0, h, w], dtype=x.dtype)  # smp's mix transformer: a placeholder feature
    filled = torch.zeros(n, c, 1, 1, dtype=x.dtype) + torch.ones((1, c, h, 1), dtype=x.dtype) * torch.full((h, w), 0.5)
    return (
        torch.cat(points),
        torch.cat(strides) * x.mean(),
        x.new_zeros(2, 3) + x.new_ones((3,)) + x.sum(),
        torch.cat([x, dummy], 1) * filled,
        (torch.full((n,), 3) + h).to(x.dtype) / 7,  # an int fill: int64 (7 does not divide 3 + h)
        # transformers' PP-DocLayout: sizes as a tensor, a causal mask of a traced size, amin
        x[0, :, :, :4] / torch.tensor([w, h, w, h], dtype=x.dtype),
        torch.tril(torch.ones(h, h, dtype=x.dtype)) + torch.triu(x[0, 0, :, :h], 1),
        x.amin(-1, keepdim=True) - x.amax(-1, keepdim=True),
        torch.ones(h, w, dtype=x.dtype).cumsum(0) * x.cumsum(dim=-1),
        (x > 0).cumsum(1).to(x.dtype) + torch.cumsum(x, 2, dtype=x.dtype),
        x.sin().repeat_interleave(2, dim=-1) + torch.repeat_interleave(x, 2, -1),
        x[0, 0].repeat_interleave(3),
    )


class Keypoints(nn.Module):
  """ultralytics' Pose head decoding keypoints in place: ``y[:, 2::3] = y[:, 2::3].sigmoid()``,
  an augmented assignment through an index, a boolean mask."""

  def forward(self, x):
    y = x.flatten(2).clone()
    y[:, 2::3] = y[:, 2::3].sigmoid()
    y[:, 0::3] += 1.5
    y[y > 1] = 0.25
    return y


class PReLUs(nn.Module):
  """nn.PReLU with a slope per channel and one shared slope (traced through: F.prelu on its
  weight), F.prelu on a 1-D input, and channel dropout in eval (the identity)."""

  def __init__(self, channels=4):
    super().__init__()
    self.per_channel, self.shared = nn.PReLU(channels), nn.PReLU()
    self.drop1, self.drop2, self.drop3 = nn.Dropout1d(0.3), nn.Dropout2d(0.3), nn.Dropout3d(0.3)
    with torch.no_grad():
      self.per_channel.weight.uniform_(-0.5, 0.5)

  def forward(self, x):
    y = self.drop2(self.shared(self.per_channel(x)))
    flat = x.flatten(2)
    return y, self.drop1(flat), self.drop3(x[:, :, None]), F.prelu(flat[0, 0], self.shared.weight)


class Selection(nn.Module):
  """RT-DETR's query selection: max(dim).values, topk, gather, boolean &/~, all/any, log, where,
  masked_fill, isfinite, full_like / ones_like / zeros_like, .long() indices, F.linear, bmm."""

  def __init__(self, k=4):
    super().__init__()
    self.k = k
    self.weight = nn.Parameter(torch.randn(5, 6))

  def forward(self, x):
    tokens = x.flatten(2).transpose(1, 2)  # (n, hw, c)
    index = torch.topk(tokens.max(-1).values, self.k, dim=1).indices
    smallest = tokens.topk(2, dim=-1, largest=False)
    picked = tokens.gather(1, index.unsqueeze(-1).repeat(1, 1, tokens.shape[-1]))
    valid = ((picked > -1) & ~(picked > 1)).all(-1, keepdim=True)
    odds = torch.log(picked.sigmoid() / (1 - picked.sigmoid()))
    filled = torch.where(valid, odds, torch.full_like(odds, 3.0)).masked_fill(picked.abs() < 0.2, -1.0)
    flags = (torch.isfinite(odds) | (odds < 0)).any(1).float() + torch.ones_like(odds).sum() * torch.zeros_like(x).sum()
    flags = flags + picked.eq(picked.clamp(-1, 1)).float().sum() + torch.ne(abs(picked), picked).float().sum()
    indices = (index.long() * 10 + smallest.indices[:, :4, 0]).to(x.dtype)  # int64 in torch, int32 in JAX
    return filled, flags, indices, smallest.values, F.linear(picked, self.weight), torch.bmm(picked, tokens.mT)


class GridSample(nn.Module):
  """F.grid_sample at points inside and outside the input, torch's modes and paddings."""

  def __init__(self, mode="bilinear", padding_mode="zeros", align_corners=False):
    super().__init__()
    self.options = dict(mode=mode, padding_mode=padding_mode, align_corners=align_corners)

  def forward(self, x):
    # (n, h, w, 2), some points outside [-1, 1]; exact in any dtype (a grid rounded differently
    # moves every sample: bfloat16 under autocast)
    grid = x[:, :2].permute(0, 2, 3, 1) * 0.5
    return F.grid_sample(x, grid, **self.options)


class Attentions(nn.Module):
  """nn.MultiheadAttention: batch first with a boolean key padding mask, sequence first with a
  float attention mask and per-head weights, other key/value sizes (separate projections), an
  unbatched input; need_weights=False."""

  def __init__(self, e=6):
    super().__init__()
    self.batch_first = nn.MultiheadAttention(e, 2, batch_first=True)
    self.sequence_first = nn.MultiheadAttention(e, 3, bias=False)
    self.other_sizes = nn.MultiheadAttention(e, 2, kdim=4, vdim=5, batch_first=True)

  def forward(self, x):
    tokens = x.flatten(2).transpose(1, 2)  # (n, l, e)
    n, length, _ = tokens.shape
    padding = torch.arange(length) >= length - 2  # the last two positions left out
    a, weights = self.batch_first(tokens, tokens, tokens, key_padding_mask=padding.expand(n, length))
    mask = (torch.arange(length)[:, None] - torch.arange(length)[None]).to(x.dtype) * 0.1
    b, heads = self.sequence_first(*(tokens.transpose(0, 1),) * 3, attn_mask=mask, average_attn_weights=False)
    c, _ = self.other_sizes(tokens, tokens[..., :4], tokens[..., 1:], need_weights=False)
    d, single = self.batch_first(tokens[0], tokens[0], tokens[0])
    return a, weights, b, heads, c, d, single


class SpatialShapes(nn.Module):
  """transformers' RT-DETR: feature sizes written one by one into a tensor made in forward
  (``torch.empty`` with constant sizes), then computed with."""

  def forward(self, x):
    features = [x, x[..., ::2, ::2]]
    shapes = torch.empty((len(features), 2), dtype=torch.long)
    for level, feature in enumerate(features):
      height, width = feature.shape[-2:]
      shapes[level, 0] = height
      shapes[level, 1] = width
    starts = torch.cat((shapes.new_zeros((1,)), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]))
    return torch.cat([f.flatten(2) for f in features], 2) * (starts.sum() + 1).to(x.dtype), shapes.to(x.dtype)


CASES = {
    "sizes written into a tensor made in forward": (SpatialShapes, (2, 3, 4, 6)),
    "selection": (Selection, (2, 6, 3, 4)),
    "grid sample bilinear zeros": (GridSample, (2, 3, 5, 6)),
    "grid sample bilinear border align corners": (
        lambda: GridSample(padding_mode="border", align_corners=True),
        (2, 3, 5, 6),
    ),
    "grid sample nearest": (lambda: GridSample(mode="nearest"), (2, 3, 5, 6)),
    "multihead attention": (Attentions, (2, 6, 3, 4)),
    "prelu and channel dropout (eval)": (PReLUs, (2, 4, 5, 5)),
    "conv1d stride padding": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 11)),
    "conv2d same dilated": (lambda: nn.Conv2d(4, 6, 4, padding="same", dilation=2), (2, 4, 9, 8)),
    "conv2d valid no bias": (lambda: nn.Conv2d(4, 6, 3, padding="valid", bias=False), (2, 4, 7, 7)),
    "conv2d grouped reflect": (
        lambda: nn.Conv2d(4, 8, 3, groups=4, padding=(1, 2), padding_mode="reflect"),
        (2, 4, 6, 7),
    ),
    "conv2d replicate": (lambda: nn.Conv2d(3, 5, 3, stride=2, padding=2, padding_mode="replicate"), (2, 3, 8, 8)),
    "conv2d circular": (lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="circular"), (2, 3, 6, 5)),
    "conv3d": (lambda: nn.Conv3d(2, 4, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)), (2, 2, 3, 7, 7)),
    "conv transpose 2d output_padding": (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1),
        (2, 4, 5, 5),
    ),
    "conv transpose 2d grouped": (lambda: nn.ConvTranspose2d(4, 8, 4, stride=2, padding=1, groups=2), (2, 4, 5, 6)),
    "conv transpose 2d dilated": (lambda: nn.ConvTranspose2d(3, 5, 3, stride=2, dilation=2, bias=False), (2, 3, 4, 4)),
    "conv transpose 1d": (lambda: nn.ConvTranspose1d(3, 5, 3, stride=3), (2, 3, 6)),
    "max pool ceil": (lambda: nn.MaxPool2d(3, 2, 1, ceil_mode=True), (2, 3, 8, 9)),
    "max pool ceil odd": (lambda: nn.MaxPool2d(2, 2, ceil_mode=True), (2, 3, 7, 7)),
    "max pool dilated": (lambda: nn.MaxPool2d(3, 2, dilation=2), (2, 3, 11, 10)),
    "max pool 1d 3d": (
        lambda: nn.Sequential(nn.MaxPool3d(2, ceil_mode=True), nn.Flatten(2), nn.MaxPool1d(3, 2)),
        (2, 3, 5, 5, 5),
    ),
    "avg pool ceil count pad": (lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True), (2, 3, 8, 9)),
    "avg pool ceil no pad count": (
        lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
        (2, 3, 8, 9),
    ),
    "avg pool divisor override": (lambda: nn.AvgPool2d(2, divisor_override=3), (2, 3, 6, 6)),
    "avg pool 1d ceil": (lambda: nn.AvgPool1d(3, 2, 1, ceil_mode=True), (2, 3, 10)),
    "adaptive avg uneven": (lambda: nn.AdaptiveAvgPool2d((4, 3)), (2, 3, 7, 10)),
    "adaptive avg upsampling": (lambda: nn.AdaptiveAvgPool2d(7), (2, 3, 3, 3)),
    "adaptive avg none": (lambda: nn.AdaptiveAvgPool2d((None, 2)), (2, 3, 5, 7)),
    "adaptive max uneven": (lambda: nn.AdaptiveMaxPool2d((3, 5)), (2, 3, 7, 11)),
    "adaptive avg 1d": (lambda: nn.AdaptiveAvgPool1d(5), (2, 3, 12)),
    "nearest x2": (lambda: nn.Upsample(scale_factor=2), (2, 3, 4, 5)),
    "nearest size": (lambda: nn.Upsample(size=(7, 9)), (2, 3, 4, 5)),
    "nearest fractional": (lambda: nn.Upsample(scale_factor=1.7), (2, 3, 5, 6)),
    "bilinear": (lambda: nn.Upsample(scale_factor=2, mode="bilinear"), (2, 3, 4, 5)),
    "bilinear align corners": (lambda: nn.Upsample(size=(7, 5), mode="bilinear", align_corners=True), (2, 3, 4, 6)),
    "bilinear fractional down": (lambda: nn.Upsample(scale_factor=0.6, mode="bilinear"), (2, 3, 9, 8)),
    "linear 1d": (lambda: nn.Upsample(scale_factor=3, mode="linear"), (2, 3, 5)),
    "group norm": (lambda: nn.GroupNorm(2, 8), (2, 8, 3, 3)),
    "layer norm": (lambda: nn.LayerNorm(5), (2, 3, 5)),
    "layer norm 2 axes no bias": (lambda: nn.LayerNorm((4, 4), bias=False), (2, 3, 4, 4)),
    "functional norms own weights, unbind": (FunctionalNorms, (2, 6, 4, 5)),
    "pads": (
        lambda: nn.Sequential(
            nn.ZeroPad2d((1, 2, 0, 3)),
            nn.ReflectionPad2d(2),
            nn.ReplicationPad2d((1, 0, 2, 1)),
            nn.ConstantPad2d(1, 0.5),
            nn.ConstantPad2d((-1, 2, 0, -3), 0.25),  # negative widths crop
        ),
        (2, 3, 4, 4),
    ),
    "activations": (
        lambda: nn.Sequential(
            nn.GELU(),
            nn.LeakyReLU(0.2),
            nn.ELU(0.5),
            nn.Hardtanh(-0.5, 0.7),
            nn.Mish(),
            nn.SiLU(),
            nn.Hardswish(),
            nn.Hardsigmoid(),
            nn.ReLU6(),
            nn.Tanh(),
            nn.Sigmoid(),
        ),
        (2, 3, 6),
    ),
    "gelu tanh softmax": (lambda: nn.Sequential(nn.GELU("tanh"), nn.Softmax(dim=1), nn.LogSoftmax(dim=-1)), (2, 3, 6)),
    "linear on features": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Identity()), (2, 3, 4)),
    "functional": (Functional, (2, 6, 4, 7)),
    "unfold": (lambda: nn.Unfold((2, 3), dilation=(1, 2), padding=1, stride=(2, 1)), (2, 3, 6, 7)),
    "encodings": (Encodings, (2, 6, 4, 5)),
    "anchors": (Anchors, (2, 3, 4, 6)),
    "keypoints (index assignment)": (Keypoints, (2, 6, 3, 4)),
    "fold, overlapping": (lambda: nn.Fold((5, 6), (2, 3), dilation=(1, 2), padding=1, stride=(2, 1)), (2, 18, 12)),
    "attention": (lambda: Attention(), (2, 4, 6, 8)),
    "attention causal scaled gqa": (lambda: Attention(causal=True, scale=0.3, kv_heads=2), (2, 4, 6, 8)),
    "attention boolean mask": (lambda: Attention(mask="bool"), (2, 4, 6, 8)),
    "attention additive mask": (lambda: Attention(mask="float"), (2, 4, 6, 8)),
    "tensor unfold windows": (lambda: Attention(mask="windows"), (2, 4, 6, 8)),
}


def assert_close(actual, expected):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    e = e.detach().numpy()
    assert a.shape == e.shape
    error = float(np.max(np.abs(np.asarray(a) - e))) / max(float(np.max(np.abs(e))), 1e-300)
    assert error <= RTOL, f"relative error {error:.3g} > {RTOL}"


@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch(name):
  make, shape = CASES[name]
  torch.manual_seed(0)
  model = nn.Sequential(make()).double().eval()  # the root is traced into, not ported as a leaf
  x = torch.randn(shape, dtype=torch.float64)
  with torch.no_grad():
    expected = model(x)
  with jax.enable_x64(True):
    module, variables = jaxbn.port(model, x, dtype=np.float64)
    assert_close(jax.jit(module.apply)(variables, x.numpy()), expected)


def test_an_index_assignment_torch_would_see_through_a_view_is_refused():
  class Aliased(nn.Module):

    def forward(self, x):
      y = x * 2
      first = y[:, 0]  # a view: torch's write below changes it too
      y[:, 0] = 0.0
      return y + first[:, None]

  class OfAView(nn.Module):

    def forward(self, x):
      y = x * 2
      y.view(-1)[0] = 0.0  # writes into y in torch
      return y

  for model in (Aliased, OfAView):
    with pytest.raises(jaxbn.PortError, match=r"x\[index\] = value on a tensor (viewed by|a view).*clone"):
      jaxbn.port(nn.Sequential(model()), np.zeros((2, 3, 4, 4), np.float32))


class Detached(nn.Module):
  """Values torch keeps out of the gradient: ``detach()`` (YOLO26's one-to-one head trains on
  detached features), ``.data`` and a ``torch.no_grad()`` block in forward."""

  def __init__(self):
    super().__init__()
    self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    self.one2many, self.one2one = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

  def forward(self, x):
    features = self.bn(self.conv(x))
    with torch.no_grad():
      scale = self.one2many(features).mean((2, 3), keepdim=True)
    return self.one2many(features) * scale, self.one2one(features.detach()) + self.one2one(features.data)


@pytest.mark.parametrize("via, api", [("port", "linen"), ("emit", "nnx")])
def test_detached_values_get_no_gradient(via, api):
  """Before detach was an identity here: conv's gradient included the one-to-one head's (and the
  no_grad block's) and differed from torch's by their size; verify's float64 gradients are 1e-9."""
  result = jaxbn.verify(Detached(), np.zeros((2, 3, 8, 8), np.float32), via=via, api=api, steps=1)
  assert result.passed, result.summary()
  gradients = next(c for c in result.checks if c.name == "gradients" and c.dtype == "float64")
  assert gradients.arbiter == "tolerance" and gradients.error <= 1e-12, result.summary()


class DetectionQueries(nn.Module):
  """RT-DETR's decoder in small: BatchNorm'd features, the top-k tokens by score gathered as
  queries, self-attention (batch first), cross-attention with a float mask (sequence first),
  offsets sampled from the feature map with F.grid_sample."""

  def __init__(self, channels=8, k=5):
    super().__init__()
    self.k = k
    self.proj, self.bn = nn.Conv2d(3, channels, 1), nn.BatchNorm2d(channels)
    self.self_attn = nn.MultiheadAttention(channels, 2, dropout=0.1, batch_first=True)  # verify sets it to 0
    self.cross_attn = nn.MultiheadAttention(channels, 2)
    self.offsets = nn.Linear(channels, 2)

  def forward(self, x):
    features = self.bn(self.proj(x))
    n, c, h, w = features.shape
    tokens = features.flatten(2).transpose(1, 2)
    index = torch.topk(tokens.max(-1).values, self.k, dim=1).indices
    queries = tokens.gather(1, index.unsqueeze(-1).repeat(1, 1, c))
    queries, _ = self.self_attn(queries, tokens, tokens)
    mask = torch.zeros(self.k, h * w, dtype=x.dtype).masked_fill(torch.arange(h * w) % 3 == 0, float("-inf"))
    memory = tokens.transpose(0, 1)
    attended, _ = self.cross_attn(queries.transpose(0, 1), memory, memory, attn_mask=mask)
    grid = self.offsets(attended.transpose(0, 1)).tanh()[:, :, None] * 1.1  # some points outside
    return F.grid_sample(features, grid, align_corners=False).flatten(1)


@pytest.mark.parametrize("via, api, layout", [("port", "linen", "NCHW"), ("emit", "nnx", "NHWC")])
def test_detection_ops_train_like_torch(via, api, layout):
  """Gradients through topk's selection, gather, both attentions and grid_sample's weights and
  points: jaxbn.verify's float64 lock-step with torch (1e-9), float32 from identical parameters."""
  case = port_harness.Case(DetectionQueries, (2, 3, 6, 7), loss="mean_square")
  port_harness.run(case, via=via, api=api, layout=layout)
