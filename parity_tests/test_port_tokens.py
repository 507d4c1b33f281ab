"""Token inputs (transformers' Sam3LiteText, whose BatchNorms sit in a MobileCLIP text encoder):
``nn.Embedding`` as ``jaxbn.layers.Embedding`` (torch's weight as ``embedding``, its padding row
given no gradient, as torch gives it none), ``argmax`` (CLIP's pooling at the end-of-text token),
integer inputs through the port, the emitted source and ``jaxbn.verify``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxbn

VOCABULARY, WIDTH = 11, 6


class TokenMixer(torch.nn.Module):
  """Embedded tokens mixed along the sequence by a depthwise convolution and BatchNorm (a
  RepMixer block), pooled at each row's largest id (CLIP: the end-of-text token)."""

  def __init__(self):
    super().__init__()
    self.embed = torch.nn.Embedding(VOCABULARY, WIDTH, padding_idx=0)
    self.mix = torch.nn.Conv1d(WIDTH, WIDTH, 3, padding=1, groups=WIDTH)
    self.bn = torch.nn.BatchNorm1d(WIDTH)
    self.head = torch.nn.Linear(WIDTH, 3)

  def forward(self, ids):
    h = self.embed(ids).transpose(1, 2)
    h = (h + self.bn(self.mix(h))).transpose(1, 2)
    pooled = h[torch.arange(h.shape[0]), ids.argmax(dim=-1)]
    return self.head(pooled) + h.mean(1).argmax(-1, keepdim=True).to(h.dtype)


def ids(seed: int = 0) -> np.ndarray:
  """Batches of 4 sequences of 7 ids, padding (0) among them."""
  drawn = np.random.default_rng(seed).integers(0, VOCABULARY, (4, 7))
  drawn[:, -2:] = 0
  return drawn.astype(np.int64)


@pytest.mark.parametrize(
    "via, api, layout", [("port", "linen", "NCHW"), ("emit", "nnx", "NCHW"), ("emit", "linen", "NHWC")]
)
def test_token_inputs_train_like_torch(via, api, layout):
  """jaxbn.verify: float64 lock-step with torch (1e-9; the embedding's gradient included: zero on
  the padding row in both, which the ids hold), float32 from identical parameters."""
  torch.manual_seed(0)
  model = TokenMixer()
  jaxbn.verification.warm_up(model, ids())
  result = jaxbn.verify(model, ids(), via=via, api=api, layout=layout, steps=2, loss="mean_square")
  assert result.passed, result.summary()


def test_the_padding_row_gets_no_gradient_and_ids_outside_the_table_are_refused():
  """As torch: the padding row's gradient is exactly zero while the others' are not; an id past
  the table raises (torch's IndexError) where the ids are concrete."""
  import jax

  torch.manual_seed(0)
  module, variables = jaxbn.port(TokenMixer(), ids())

  def loss(params):
    out, _ = module.apply({**variables, "params": params}, ids(), train=True, mutable=["batch_stats"])
    return (out**2).sum()

  table = jax.grad(loss)(variables["params"])["embed"]["embedding"]
  assert np.all(np.asarray(table[0]) == 0) and np.any(np.asarray(table[1:]) != 0)
  with pytest.raises(IndexError, match=r"ids from 0 to 11, outside a table of 11 rows"):
    module.apply(variables, np.full((2, 7), VOCABULARY) * (np.arange(7) % 2))
