"""jaxbn.port takes forwards as third-party libraries write them and returns their output classes.

The model here has the shape of Hugging Face transformers' vision models:
``forward(pixel_values, output_hidden_states=None, return_dict=None, **kwargs)`` returning a
``ModelOutput`` (an OrderedDict subclass that is a dataclass, ``None`` fields left out) or, with
``return_dict=False``, a tuple. Tolerance: float32 outputs within 1e-6 of the largest |output|
(measured <= 2e-7).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.util

import jax
import numpy as np
import pytest
import torch
from torch import nn

import jaxbn

RTOL = 1e-6
FINFO, IINFO = torch.finfo, torch.iinfo


class ModelOutput(collections.OrderedDict):
  """transformers.utils.ModelOutput's behaviour, trimmed: fields that are not None are also items,
  and each subclass is a torch pytree of them."""

  def __init_subclass__(cls):
    torch.utils._pytree.register_pytree_node(
        cls,
        lambda output: (list(output.values()), list(output.keys())),
        lambda values, keys: cls(**dict(zip(keys, values, strict=True))),
    )

  def __post_init__(self):
    for field in dataclasses.fields(self):
      if getattr(self, field.name) is not None:
        self[field.name] = getattr(self, field.name)

  def to_tuple(self):
    return tuple(self[key] for key in self.keys())


@dataclasses.dataclass
class BaseModelOutputWithPooling(ModelOutput):
  last_hidden_state: torch.Tensor | None = None
  pooler_output: torch.Tensor | None = None
  hidden_states: tuple | None = None


class VisionModel(nn.Module):

  def __init__(self):
    super().__init__()
    self.embedder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    self.encoder = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))

  def forward(self, pixel_values, output_hidden_states=None, return_dict=None, **kwargs):
    embedded = self.embedder(pixel_values)
    hidden = self.encoder(embedded)
    pooled = hidden.mean((2, 3))
    states = (embedded, hidden) if output_hidden_states else None
    if return_dict is False:
      return (hidden, pooled) + ((states,) if states else ())
    return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled, hidden_states=states)


def model():
  torch.manual_seed(0)
  return VisionModel()


X = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)


def relative(actual, expected) -> float:
  expected = expected.detach().numpy()
  return float(np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected)))


def assert_matches_torch_in_both_modes(net, module, variables):
  """Eval, then a training forward, against torch's (RTOL); returns the training step's state."""
  for train in (False, True):
    net.train(train)
    with torch.no_grad():
      expected = net(torch.from_numpy(X))
    output, state = module.apply(variables, X, train=train, mutable=["batch_stats"])
    assert relative(output, expected) <= RTOL, train
  return state


def test_optional_keywords_and_kwargs_keep_their_defaults_and_the_output_its_class():
  torch_model = model()
  module, variables = jaxbn.port(torch_model, X)
  with torch.no_grad():
    evaluated = torch_model.eval()(torch.from_numpy(X))
  for train in (False, True):
    torch_model.train(train)
    with torch.no_grad():
      expected = torch_model(torch.from_numpy(X))
    output = (
        module.apply(variables, X, train=train, mutable=["batch_stats"])[0] if train else module.apply(variables, X)
    )
    assert type(output) is BaseModelOutputWithPooling and list(output.keys()) == ["last_hidden_state", "pooler_output"]
    assert output.hidden_states is None
    for key in expected:
      assert relative(output[key], expected[key]) <= RTOL, (train, key)
  jitted = jax.jit(module.apply)(variables, X)  # a registered pytree: jit returns the class
  assert type(jitted) is BaseModelOutputWithPooling and relative(jitted.pooler_output, evaluated.pooler_output) <= RTOL


def test_static_inputs_trace_a_keyword_at_its_value_and_refuse_another():
  torch_model = model().eval()
  module, variables = jaxbn.port(torch_model, X, static_inputs={"return_dict": False, "output_hidden_states": True})
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(X), output_hidden_states=True, return_dict=False)
  for output in (module.apply(variables, X), module.apply(variables, X, return_dict=False)):
    assert type(output) is tuple and len(output) == 3 and len(output[2]) == 2
    assert relative(output[1], expected[1]) <= RTOL and relative(output[2][0], expected[2][0]) <= RTOL
  with pytest.raises(AssertionError, match="return_dict has been specialized to have value False"):
    module.apply(variables, X, return_dict=True)


def test_a_keyword_the_trace_never_read_is_refused_not_ignored():
  module, variables = jaxbn.port(model(), X)  # return_dict=None: the branch on it was taken when porting
  with pytest.raises(jaxbn.PortError, match=r"without its input return_dict .*static_inputs=\{'return_dict': \.\.\.\}"):
    module.apply(variables, X, return_dict=False)
  with pytest.raises(jaxbn.PortError, match=r"without its input interpolate_pos_encoding .*static_inputs"):
    module.apply(variables, X, interpolate_pos_encoding=True)  # into **kwargs, which forward never reads
  assert type(module.apply(variables, X, return_dict=None)) is BaseModelOutputWithPooling  # the default is fine


def test_emitted_source_takes_only_the_inputs_its_code_reads(tmp_path):
  torch_model = model().eval()
  as_dict = jaxbn.emit(torch_model, X, tmp_path / "dict", static_inputs={"return_dict": True}).read_text()
  assert "class BaseModelOutputWithPooling:" in as_dict  # the dataclass, defined in the file
  path = jaxbn.emit(torch_model, X, tmp_path / "tuple", static_inputs={"return_dict": False})
  assert "def __call__(self, pixel_values, return_dict=False, train: bool = False):" in path.read_text()
  spec = importlib.util.spec_from_file_location("emitted_inputs", path)
  source = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(source)
  module, variables = source.load()
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(X), return_dict=False)
  assert relative(module.apply(variables, X)[0], expected[0]) <= RTOL
  with pytest.raises(TypeError, match="output_hidden_states"):  # Python refuses what the code would ignore
    module.apply(variables, X, output_hidden_states=True)


def test_a_plain_dataclass_output_and_star_args():
  @dataclasses.dataclass
  class Prediction:
    logits: torch.Tensor
    features: torch.Tensor

  class Net(nn.Module):

    def __init__(self):
      super().__init__()
      self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x, *args):
      features = self.bn(self.conv(x))
      return Prediction(features.mean((2, 3)), features)

  torch.manual_seed(0)
  net = Net().eval()
  module, variables = jaxbn.port(net, X)
  output = jax.jit(module.apply)(variables, X)
  with torch.no_grad():
    expected = net(torch.from_numpy(X))
  assert type(output) is Prediction and relative(output.logits, expected.logits) <= RTOL
  with pytest.raises(jaxbn.PortError, match="without its input \\*args .*give it to port\\(\\) as an example input"):
    module.apply(variables, X, X)


def test_star_args_and_kwargs_passed_on_to_another_call_pass_nothing():
  class Detector(nn.Module):  # ultralytics' BaseModel.forward(x, *args, **kwargs) -> self.predict(...)

    def __init__(self):
      super().__init__()
      self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x, *args, **kwargs):
      if isinstance(x, dict):
        return self.loss(x, *args, **kwargs)
      return self.predict(x, *args, **kwargs)

    def predict(self, x, profile=False, augment=False):
      return self.bn(self.conv(x))

  torch.manual_seed(0)
  net = Detector()
  module, variables = jaxbn.port(net, X)
  assert_matches_torch_in_both_modes(net, module, variables)
  with pytest.raises(jaxbn.PortError, match="without its input augment .*static_inputs=\\{'augment': \\.\\.\\.\\}"):
    module.apply(variables, X, augment=True)


def test_modules_made_in_forward_from_the_models_own_are_traced_through():
  class Stages(nn.Module):  # smp's DPN encoder: stages as slices of one Sequential; an inline nn.ReLU()

    def __init__(self):
      super().__init__()
      self.features = nn.Sequential(
          nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
      )

    def forward(self, x):
      return nn.ReLU()(self.features[2:](self.features[:2](x)))

  torch.manual_seed(0)
  net = Stages()
  module, variables = jaxbn.port(net, X)
  state = assert_matches_torch_in_both_modes(net, module, variables)
  assert relative(state["batch_stats"]["features"]["3"]["mean"], net.features[3].running_mean) <= RTOL

  class MadeInForward(nn.Module):

    def forward(self, x):
      return nn.Conv2d(3, 4, 1)(x)

  with pytest.raises(
      jaxbn.PortError, match=r"Conv2d is made in forward and holds tensors .*\(weight, bias\).*submodule"
  ):
    jaxbn.port(MadeInForward(), X)


def returns_tuple_if_asked(forward):
  """transformers' ``@can_return_tuple``, trimmed: a ``wrapper(self, *args, **kwargs)``."""

  @functools.wraps(forward)
  def wrapper(self, *args, **kwargs):
    output = forward(self, *args, **kwargs)
    return output.to_tuple() if kwargs.get("return_dict") is False else output

  return wrapper


class DecoratedModel(VisionModel):

  @returns_tuple_if_asked
  def forward(self, pixel_values, output_hidden_states=None, return_dict=None, **kwargs):
    return super().forward(pixel_values, output_hidden_states)


def test_a_decorated_forward_is_traced_with_the_signature_it_wraps():
  torch.manual_seed(0)
  net = DecoratedModel()
  module, variables = jaxbn.port(net, X)
  assert DecoratedModel.__dict__["forward"].__wrapped__  # the class is left as found
  for train in (False, True):
    net.train(train)
    with torch.no_grad():
      expected = net(torch.from_numpy(X))
    output = module.apply(variables, X, train=train, mutable=["batch_stats"])[0]
    assert type(output) is BaseModelOutputWithPooling, train
    assert relative(output.pooler_output, expected.pooler_output) <= RTOL, train


def test_an_optional_input_left_at_none_is_none_in_forward():
  class Masked(nn.Module):  # transformers' RT-DETR: ``if inputs_embeds is None:`` / ``if pixel_mask is None:``

    def __init__(self):
      super().__init__()
      self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, pixel_values, pixel_mask=None, inputs_embeds=None):
      features = self.bn(self.conv(pixel_values)) if inputs_embeds is None else inputs_embeds
      if pixel_mask is None:
        pixel_mask = features.new_ones((features.shape[0], 1, *features.shape[2:]))
      return features * pixel_mask

  torch.manual_seed(0)
  net = Masked()
  module, variables = jaxbn.port(net, X)
  assert_matches_torch_in_both_modes(net, module, variables)
  with pytest.raises(jaxbn.PortError, match="without its input pixel_mask .*give it to port"):
    module.apply(variables, X, pixel_mask=np.ones((2, 1, 8, 8), np.float32))


def test_finfo_of_a_traced_dtype_is_the_examples():
  class Clamped(nn.Module):  # transformers' D-FINE, RT-DETR: ``torch.finfo(x.dtype).min`` fills a mask

    def __init__(self):
      super().__init__()
      self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
      y = self.bn(self.conv(x))
      return y.clamp(min=torch.finfo(y.dtype).min / 2, max=torch.finfo(x.dtype).max / 2) + torch.iinfo(torch.int8).max

  torch.manual_seed(0)
  net = Clamped()
  module, variables = jaxbn.port(net, X)
  assert_matches_torch_in_both_modes(net, module, variables)
  assert torch.finfo is FINFO and torch.iinfo is IINFO  # torch's own again after the trace


def test_torch_check_on_shapes_is_a_decision_guarded_where_the_port_runs():
  class Checked(nn.Module):  # transformers' torch_compilable_check in RT-DETR's deformable attention

    def __init__(self):
      super().__init__()
      self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
      y = self.bn(self.conv(x))
      torch._check(y.shape[2] * y.shape[3] == 64)
      torch._check_with(ValueError, y.shape[1] == 4, lambda: "four channels")
      condition = y.shape[0] == 2
      if callable(condition):  # transformers': every proxy is callable, a bool is not
        condition = condition()
      torch._check(condition)
      return y

  torch.manual_seed(0)
  net = Checked()
  module, variables = jaxbn.port(net, X)
  assert_matches_torch_in_both_modes(net, module, variables)
  with pytest.raises(jaxbn.PortError, match="specialised this Python branch"):
    module.apply(variables, np.zeros((2, 3, 4, 4), np.float32))


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_emitted_source_returns_the_dataclass_as_a_flax_struct(api, tmp_path):
  """A ModelOutput (a dataclass) is defined in model.py as a ``flax.struct.dataclass`` with torch's
  fields; its values are torch's within RTOL in both modes (through jaxbn.verify, float64 1e-9)."""
  torch.manual_seed(0)
  net = VisionModel()
  path = jaxbn.emit(net, X, tmp_path / "out", api=api)
  text = path.read_text()
  assert "@struct.dataclass\nclass BaseModelOutputWithPooling:" in text and "pooler_output: Any = None" in text
  result = jaxbn.verify(net, X, via="emit", api=api, steps=1, floor=RTOL)
  assert result.passed, result.summary()
