"""Mixed precision as torch.autocast does it, against torch.autocast itself.

The port's lists (``jaxbn/_src/port/autocast.py``) are checked against the installed torch twice:
in its dispatcher (every listed ATen op has the device's autocast kernel, and every other op the
port reaches has none), and on CPU by running every op of ``test_port_ops.CASES`` under
``torch.autocast("cpu", torch.bfloat16)``, comparing each call's result dtype with the lists'
prediction. The ported cases then match torch's autocast outputs in dtype and within 2 bfloat16
steps.

On models (one training step from identical parameters, float32 loss) torch's bfloat16 autocast
is itself some distance from float32 (``d_autocast``); jaxbn's bfloat16 must be at most
1.5 * d_autocast from float32 and 2 * d_autocast from autocast, on the train outputs, the
running-statistic updates and the gradients (relative L2 over each group), with every variable
still float32 after the step.
"""

from __future__ import annotations

import copy
import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torchvision
from flax import nnx
from torch.overrides import TorchFunctionMode

import jaxbn
from jaxbn._src.port import autocast
from parity_tests.test_port_models import FULL, HandWritten
from parity_tests.test_port_ops import CASES
from parity_tests.test_resnet_parity import relative_l2

# Two bfloat16 steps (2 ** -7) relative to the largest |output|: each side rounds every op's
# result to bfloat16 and the two accumulate in different orders.
CASE_RTOL = 2**-7


def aten_names_the_port_reaches() -> set[str]:
  names = {name for name in autocast.ATEN.values() if isinstance(name, str)}
  for mode in ("constant", "reflect", "replicate", "circular"):
    names |= {autocast._pad(None, (1,) * (2 * n), mode) for n in (1, 2, 3)}
  shapes = {"nearest": (3, 4, 5), "nearest-exact": (3, 4, 5), "linear": (3,), "bilinear": (4,), "bicubic": (4,)}
  shapes["trilinear"] = (5,)
  for mode, ndims in shapes.items():
    for ndim in ndims:
      x = jax.ShapeDtypeStruct((1,) * ndim, jnp.float32)
      names.add(autocast._interpolate(x, mode=mode))
      if mode in ("bilinear", "bicubic"):
        names.add(autocast._interpolate(x, mode=mode, antialias=True))
  one = jnp.ones(())
  names |= {autocast._pow(one, 2.0), autocast._pow(one, one), autocast._pow(2.0, one)}
  names |= {autocast._sum(one), autocast._sum(one, 0)}
  names |= {autocast._einsum("ij,jk->ik", one, one), autocast._einsum("ij,ij->ij", one, one)}
  return names - {None}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_lists_are_torchs_autocast_kernels(device):
  key = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}[device]
  reached = aten_names_the_port_reaches()
  listed = set(autocast.LISTS[device])
  assert listed <= reached, f"listed but never reached: {listed - reached}"
  registered = {name for name in reached if torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{name}", key)}
  assert registered == listed, (
      f"torch registers {key} kernels for {sorted(registered - listed)} (missing from the list) and not"
      f" for {sorted(listed - registered)} (listed)"
  )


DUNDERS = {torch.Tensor.__matmul__: operator.matmul, torch.Tensor.__pow__: operator.pow}


class Recorder(TorchFunctionMode):
  """Every torch call whose key the port's autocast table knows, with its arguments and result."""

  def __init__(self):
    super().__init__()
    self.calls = []

  def __torch_function__(self, func, types, args=(), kwargs=None):
    kwargs = kwargs or {}
    result = func(*args, **kwargs)
    key = DUNDERS.get(func, func)
    if key in autocast.ATEN:
      self.calls.append((key, args, kwargs, result))
    return result


def as_shapes(tree):
  return jax.tree.map(
      lambda v: jax.ShapeDtypeStruct(tuple(v.shape), jnp.dtype(str(v.dtype).removeprefix("torch.")))
      if isinstance(v, torch.Tensor)
      else v,
      tree,
  )


def predicted_dtype(policy, key, args, kwargs):
  """The result's dtype torch gives when the op's floating arguments are cast as the lists say."""
  target = policy.target(key, as_shapes(args), as_shapes(kwargs))

  def cast(v):
    eligible = isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float64
    return v.to(getattr(torch, jnp.dtype(target).name)) if target is not None and eligible else v

  with torch.autocast("cpu", enabled=False):
    result = key(*jax.tree.map(cast, args), **jax.tree.map(cast, kwargs))
  return jax.tree.leaves(result)[0].dtype


# Ops torch computes as several ATen ops, each with its own autocast rule: refused under autocast.
COMPOSITE_CASES = ("multihead attention",)


def test_composite_ops_are_refused_under_autocast_by_name():
  make, shape = CASES["multihead attention"]
  with pytest.raises(jaxbn.PortError, match=r"nn\.MultiheadAttention .* under autocast: torch casts each"):
    jaxbn.port(torch.nn.Sequential(make()).eval(), torch.randn(shape), autocast=jnp.bfloat16, autocast_device="cpu")


@pytest.mark.parametrize("name", [name for name in CASES if name not in COMPOSITE_CASES])
def test_port_matches_torch_autocast_op_by_op(name):
  make, shape = CASES[name]
  torch.manual_seed(0)
  model = torch.nn.Sequential(make()).eval()
  x32 = torch.randn(shape)
  module, variables = jaxbn.port(model, x32, autocast=jnp.bfloat16, autocast_device="cpu")
  policy = autocast.Autocast("bfloat16", "cpu")
  for x in (x32, x32.bfloat16()):  # a float32 input, and one a previous low-precision layer made
    recorder = Recorder()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), recorder:
      expected = model(x)
    for key, args, kwargs, result in recorder.calls:
      observed = jax.tree.leaves(result)[0].dtype
      assert observed == predicted_dtype(policy, key, args, kwargs), f"{autocast.ATEN[key]}: torch gave {observed}"

    actual = jax.jit(module.apply)(variables, jnp.asarray(x.float().numpy(), str(x.dtype).removeprefix("torch.")))
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
      assert str(a.dtype) == str(e.dtype).removeprefix("torch."), (x.dtype, a.dtype, e.dtype)
      e = e.float().numpy()
      error = float(np.max(np.abs(np.asarray(a, np.float32) - e))) / max(float(np.max(np.abs(e))), 1e-30)
      assert error <= CASE_RTOL, f"{x.dtype} input: relative error {error:.3g} > {CASE_RTOL}"


def test_the_device_chooses_the_lists():
  """CUDA's float32 list holds softmax and log_softmax; CPU's does not (torch's lists)."""
  torch.manual_seed(0)
  model = torch.nn.Sequential(
      torch.nn.Linear(6, 6), torch.nn.Softmax(-1), torch.nn.Linear(6, 4), torch.nn.LogSoftmax(-1)
  )
  x = torch.randn(2, 6)
  for device, expected in (("cpu", jnp.bfloat16), ("cuda", jnp.float32)):
    module, variables = jaxbn.port(model, x, autocast=jnp.bfloat16, autocast_device=device)
    assert module.apply(variables, x.numpy()).dtype == expected, device
  with pytest.raises(ValueError, match="jnp.bfloat16 or jnp.float16"):
    jaxbn.port(model, x, autocast=jnp.float32)
  with pytest.raises(ValueError, match="autocast_device must be one of"):
    jaxbn.port(model, x, autocast=jnp.bfloat16, autocast_device="tpu")


# --- models: one training step from identical parameters ------------------------------------------


def torch_step(model, x, labels, autocast=False):
  """Train outputs, running-statistic updates and gradients of one step of the model's copy, in
  float32 or inside torch.autocast("cpu", torch.bfloat16)."""
  model = copy.deepcopy(model).train()
  before = {
      f"{path}.{name}": getattr(layer, name).clone()
      for path, layer in model.named_modules()
      if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)
      for name in ("running_mean", "running_var")
  }
  with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
    output = model(x)
  logits = output[0] if isinstance(output, tuple) else output
  torch.nn.functional.cross_entropy(logits.float(), labels).backward()
  after = model.state_dict()
  return (
      {"logits": logits.detach().float().numpy()},
      {k: (after[k] - v).numpy() for k, v in before.items()},
      {k: p.grad.numpy() for k, p in model.named_parameters() if p.grad is not None},
  )


def check_against_autocast(jaxbn_step, model, x, labels):
  float32 = torch_step(model, x, labels)
  mixed = torch_step(model, x, labels, autocast=True)
  ours = jaxbn_step()
  for what, f32, auto, mine in zip(
      ("train outputs", "statistic updates", "gradients"), float32, mixed, ours, strict=True
  ):
    d_autocast, d_float32, d_to_autocast = relative_l2(auto, f32), relative_l2(mine, f32), relative_l2(mine, auto)
    assert d_autocast > 1e-4, f"{what}: autocast is {d_autocast:.2g} from float32, so it did not run in bfloat16"
    assert (
        d_float32 <= 1.5 * d_autocast
    ), f"{what}: jaxbn {d_float32:.3g} from float32 > 1.5 x autocast's {d_autocast:.3g}"
    assert d_to_autocast <= 2 * d_autocast, f"{what}: jaxbn {d_to_autocast:.3g} from autocast > 2 x {d_autocast:.3g}"


def batch(shape, classes=10):
  generator = torch.Generator().manual_seed(1)
  return torch.randn(shape, generator=generator), torch.randint(0, classes, (shape[0],), generator=generator)


def stats_updates(before: dict, after: dict) -> dict:
  return {k: np.asarray(after[k]) - np.asarray(before[k]) for k in after if k.endswith(("running_mean", "running_var"))}


def linen_step(module, variables, x, labels):
  """One step of a Linen model in mixed precision: its outputs, statistic updates and gradients by
  torch key, after checking that the logits are bfloat16 and every variable stays float32."""

  def loss(params):
    output, updates = module.apply(
        {**variables, "params": params}, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)}
    )
    logits = output[0] if isinstance(output, tuple) else output
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels.numpy()).mean()
    return loss, (logits, updates)

  grads, (logits, updates) = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
  tx = optax.sgd(0.1, momentum=0.9)
  stepped = optax.apply_updates(variables["params"], tx.update(grads, tx.init(variables["params"]))[0])
  assert logits.dtype == jnp.bfloat16
  floating = [v for v in jax.tree.leaves((grads, stepped, updates)) if jnp.issubdtype(v.dtype, jnp.floating)]
  assert {str(v.dtype) for v in floating} == {"float32"}
  before = jaxbn.convert.to_state_dict({"batch_stats": variables["batch_stats"]})
  return (
      {"logits": np.asarray(logits, np.float32)},
      stats_updates(before, jaxbn.convert.to_state_dict(updates)),
      jaxbn.convert.to_state_dict({"params": grads}),
  )


def ported_step(model, x, labels):
  """jaxbn.port(autocast=bfloat16)."""
  module, variables = jaxbn.port(model, x, autocast=jnp.bfloat16, autocast_device="cpu")
  return linen_step(module, variables, x.numpy(), labels)


PORTED = {  # CI: the hand-written model holds every port mechanism (FrozenBatchNorm2d, BatchNorm1d, cat, mean)
    "handwritten": (HandWritten, (8, 3, 16, 16)),
}
PORTED_FULL = {  # make test-models
    "torchvision:mobilenet_v3_small": (FULL["torchvision:mobilenet_v3_small"].build, (8, 3, 32, 32)),
    "torchvision:resnet18": (functools.partial(torchvision.models.resnet18, num_classes=10), (8, 3, 32, 32)),
}


def run_ported(name, build, shape):
  torch.manual_seed(0)
  model = build()
  if name == "handwritten":  # its FrozenBatchNorm2d: statistics a trained layer would hold
    model.frozen.running_var.uniform_(0.5, 2)
    model.frozen.running_mean.normal_()
  x, labels = batch(shape)
  for layer in model.modules():  # dropout draws differ between the frameworks
    if isinstance(layer, torch.nn.Dropout):
      layer.p = 0.0
  check_against_autocast(lambda: ported_step(model, x, labels), model, x, labels)


@pytest.mark.parametrize("name", list(PORTED))
def test_ported_model_step_matches_torch_autocast(name):
  run_ported(name, *PORTED[name])


@pytest.mark.full_models
@pytest.mark.parametrize("name", list(PORTED_FULL))
def test_ported_model_step_matches_torch_autocast_full(name):
  run_ported(name, *PORTED_FULL[name])


def linen_resnet_step(torch_model, x, labels):
  """jaxbn.models.resnet18(dtype=bfloat16): flax's own dtype on the convolutions and fc."""
  model = jaxbn.models.resnet18(num_classes=10, dtype=jnp.bfloat16, input_layout="NCHW")
  template = jax.eval_shape(model.init, jax.random.key(0), x.numpy())
  return linen_step(model, jaxbn.convert.from_torch(torch_model.state_dict(), template).variables, x.numpy(), labels)


def nnx_resnet_step(torch_model, x, labels):
  """A jaxbn.models.nnx ResNet with ``dtype`` set on its nnx.Conv and nnx.Linear layers."""
  model = jaxbn.models.nnx.ResNet(jaxbn.models.nnx.BasicBlock, (1, 1, 1, 1), 10, rngs=nnx.Rngs(0))
  jaxbn.convert.from_torch(torch_model.state_dict(), model)
  for _, layer in nnx.iter_modules(model):
    if isinstance(layer, (nnx.Conv, nnx.Linear)):
      layer.dtype = jnp.bfloat16
  before = jaxbn.convert.to_state_dict(model)
  model.train()

  def loss(model):
    logits = model(jnp.moveaxis(x.numpy(), 1, -1))
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels.numpy()).mean(), logits

  grads, logits = nnx.jit(nnx.grad(loss, has_aux=True))(model)
  assert logits.dtype == jnp.bfloat16
  floating = [v for v in jax.tree.leaves((nnx.state(grads), nnx.state(model))) if jnp.issubdtype(v.dtype, jnp.floating)]
  assert {str(v.dtype) for v in floating} == {"float32"}
  return (
      {"logits": np.asarray(logits, np.float32)},
      stats_updates(before, jaxbn.convert.to_state_dict(model)),
      jaxbn.convert.to_state_dict(grads),
  )


def test_resnet18_with_flax_dtype_matches_torch_autocast():
  torch.manual_seed(0)
  torch_model = torchvision.models.resnet18(num_classes=10)
  x, labels = batch((8, 3, 32, 32))
  check_against_autocast(lambda: linen_resnet_step(torch_model, x, labels), torch_model, x, labels)


def test_nnx_resnet_with_dtype_set_on_its_layers_matches_torch_autocast():
  """The NNX way on a one-block-per-stage ResNet (resnet18's blocks, half the compile time)."""
  torch.manual_seed(0)
  torch_model = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
  x, labels = batch((8, 3, 32, 32))
  check_against_autocast(lambda: nnx_resnet_step(torch_model, x, labels), torch_model, x, labels)
