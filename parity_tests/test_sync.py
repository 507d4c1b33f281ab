"""Statistics across devices (``axis_name``) against torch BatchNorm over the concatenated global
batch, which is what torch's SyncBatchNorm computes (torch runs it on CUDA only).

Eight simulated CPU devices (conftest.py). Each test runs jaxbn.BatchNorm and jaxbn.nnx.BatchNorm
(``api``); the last one runs an NNX module in place under nnx.shard_map and nnx.jit. Equal and uneven per-device batches (padding marked
by ``mask``), with and without ``axis_index_groups``, under shard_map; uneven under pmap and
vmap; and plain
jit over a batch-sharded input without ``axis_name``. After every step: outputs, gradients w.r.t.
input, scale and bias (summed over the devices of a group), running statistics, counter.
Tolerances as test_batch_norm_parity: outputs and input gradients 2e-6; scale and bias gradients
2e-6 * sqrt(n); running statistics 5e-7 relative to max(|value|, 1); counter exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from parity_tests.torch_reference import APIS, make_batchnorm, random_batch, to_torch, variables_from_torch

DEVICES, CHANNELS, SPATIAL = 8, 5, (3, 5)
ATOL, STATS_RTOL = 2e-6, 5e-7


def torch_reference(torch_bn, x, cotangent):
  """torch on one (global or group) batch in NCHW: outputs, grads, and the updated buffers."""
  xt = to_torch(x).requires_grad_(True)
  torch_bn.zero_grad(set_to_none=True)
  y = torch_bn(xt)
  (y * to_torch(cotangent)).sum().backward()
  return dict(
      y=y.detach().numpy(),
      dx=xt.grad.numpy(),
      scale=torch_bn.weight.grad.numpy(),
      bias=torch_bn.bias.grad.numpy(),
      stats=variables_from_torch(torch_bn)["batch_stats"],
  )


def assert_matches(actual: dict, expected: dict, n: int):
  np.testing.assert_allclose(actual["y"], expected["y"], atol=ATOL, rtol=0)
  np.testing.assert_allclose(actual["dx"], expected["dx"], atol=ATOL, rtol=0)
  for name in ("scale", "bias"):
    np.testing.assert_allclose(actual[name], expected[name], atol=ATOL * np.sqrt(n), rtol=0)
  for name in ("mean", "var"):
    scale = np.maximum(np.abs(expected["stats"][name]), 1.0)
    assert np.max(np.abs(actual["stats"][name] - expected["stats"][name]) / scale) <= STATS_RTOL, name
  assert int(actual["stats"]["num_batches_tracked"]) == int(expected["stats"]["num_batches_tracked"])


def device_step(module, groups=None):
  """One device's train step: forward, backward, and parameter gradients summed over its group.
  Parameters and running statistics are per-device copies (a leading axis of size 1 inside the
  map), so gradients are local until the explicit psum, and each group keeps its own statistics."""

  def step(params, batch_stats, x, cotangent, mask):
    params, batch_stats = jax.tree.map(lambda a: a[0], (params, batch_stats))

    def forward(x, params):
      return module.apply(
          {"params": params, "batch_stats": batch_stats},
          x,
          use_running_average=False,
          mask=mask,
          mutable=["batch_stats"],
      )

    y, vjp, updates = jax.vjp(forward, x, params, has_aux=True)
    dx, dparams = vjp(cotangent)
    # The group's sum; via all_gather, as JAX 0.10 has no grouped psum of device-invariant values.
    dparams = jax.tree.map(lambda g: jax.lax.all_gather(g, "data", axis_index_groups=groups).sum(0), dparams)
    leading = lambda tree: jax.tree.map(lambda a: a[None], tree)  # noqa: E731
    return y, dx, leading(dparams), leading(updates["batch_stats"])

  return step


def per_device(variables, devices):
  """(params, batch_stats), each array repeated along a new leading device axis."""
  repeat = lambda a: np.stack([np.asarray(a)] * devices)  # noqa: E731
  return jax.tree.map(repeat, variables["params"]), jax.tree.map(repeat, variables["batch_stats"])


def to_devices(x_nchw, counts, pad_to):
  """Splits a torch-layout global batch into per-device NHWC shards of ``pad_to`` examples;
  padding holds finite junk (1e3), marked invalid by the mask."""
  shards, masks, start = [], [], 0
  for count in counts:
    shard = np.full((pad_to, *x_nchw.shape[2:], x_nchw.shape[1]), 1e3, np.float32)
    shard[:count] = np.moveaxis(x_nchw[start : start + count], 1, -1)
    shards.append(shard)
    masks.append((np.arange(pad_to) < count)[:, None, None, None])
    start += count
  return np.concatenate(shards), np.concatenate(masks)


def from_devices(values, counts, pad_to):
  """Valid examples of per-device NHWC results, concatenated back into torch layout."""
  parts = [values[d * pad_to : d * pad_to + c] for d, c in enumerate(counts)]
  return np.moveaxis(np.concatenate(parts), -1, 1)


CASES = {
    "equal": ([3] * DEVICES, None),
    "uneven": ([3, 1, 2, 3, 0, 3, 1, 2], None),
    "groups": ([3, 1, 2, 3, 2, 3, 1, 2], [[0, 1, 2, 3], [4, 5, 6, 7]]),
}


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("case", CASES)
def test_shard_map_matches_torch_on_the_global_batch(case, api):
  counts, groups = CASES[case]
  pad_to = max(counts)
  mesh = jax.make_mesh((DEVICES,), ("data",))
  sharded = NamedSharding(mesh, P("data"))
  module = make_batchnorm(api, CHANNELS, axis_name="data", axis_index_groups=groups)
  step = jax.jit(
      jax.shard_map(
          device_step(module, groups),
          mesh=mesh,
          in_specs=P("data"),
          out_specs=P("data"),
      )
  )
  group_members = groups or [list(range(DEVICES))]
  torch_bns = [torch.nn.BatchNorm2d(CHANNELS) for _ in group_members]  # one per group
  for torch_bn in torch_bns:
    with torch.no_grad():  # non-trivial affine
      torch_bn.weight.copy_(torch.linspace(0.5, 1.5, CHANNELS))
      torch_bn.bias.copy_(torch.linspace(-1, 1, CHANNELS))
  variables = variables_from_torch(torch_bns[0])
  params, batch_stats = jax.device_put(per_device(variables, DEVICES), sharded)
  rng = np.random.default_rng(0)
  offsets = np.cumsum([0] + counts)
  for _ in range(3):
    x = random_batch(rng, (sum(counts), CHANNELS, *SPATIAL), np.float32)
    cotangent = rng.standard_normal(x.shape).astype(np.float32)
    x_dev, mask = to_devices(x, counts, pad_to)
    cot_dev, _ = to_devices(cotangent, counts, pad_to)
    cot_dev = np.where(mask, cot_dev, 0).astype(np.float32)  # padded outputs feed no loss
    y, dx, dparams, batch_stats = step(params, batch_stats, *jax.device_put((x_dev, cot_dev, mask), sharded))
    y, dx, dparams, stats = jax.tree.map(np.asarray, (y, dx, dparams, batch_stats))
    for torch_bn, members in zip(torch_bns, group_members, strict=True):
      rows = np.concatenate([np.arange(offsets[d], offsets[d + 1]) for d in members])
      expected = torch_reference(torch_bn, x[rows], cotangent[rows])
      member_counts = [counts[d] if d in members else 0 for d in range(DEVICES)]
      for d in members:  # every device of a group: the group's gradients and statistics
        actual = dict(
            y=from_devices(y, member_counts, pad_to),
            dx=from_devices(dx, member_counts, pad_to),
            scale=dparams["scale"][d],
            bias=dparams["bias"][d],
            stats=jax.tree.map(lambda a: a[d], stats),
        )
        assert_matches(actual, expected, n=len(rows) * np.prod(SPATIAL))


MAPS = {
    "pmap": lambda step: jax.pmap(step, axis_name="data"),
    "vmap": lambda step: jax.jit(jax.vmap(step, axis_name="data")),
}


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("mapping", MAPS)
def test_pmap_and_vmap_match_torch_on_the_global_batch(mapping, api):
  counts, pad_to = [2, 1, 2, 2], 2  # uneven: one device holds a padded example
  module = make_batchnorm(api, CHANNELS, axis_name="data")
  step = MAPS[mapping](device_step(module))
  torch_bn = torch.nn.BatchNorm2d(CHANNELS)
  params, batch_stats = jax.tree.map(lambda a: a[:, None], per_device(variables_from_torch(torch_bn), len(counts)))
  rng = np.random.default_rng(1)
  split = lambda a: a.reshape(len(counts), pad_to, *a.shape[1:])  # noqa: E731
  for _ in range(3):
    x = random_batch(rng, (sum(counts), CHANNELS, *SPATIAL), np.float32)
    cotangent = rng.standard_normal(x.shape).astype(np.float32)
    x_dev, mask = to_devices(x, counts, pad_to)
    cot_dev, _ = to_devices(cotangent, counts, pad_to)
    cot_dev = np.where(mask, cot_dev, 0).astype(np.float32)
    y, dx, dparams, batch_stats = step(params, batch_stats, split(x_dev), split(cot_dev), split(mask))
    expected = torch_reference(torch_bn, x, cotangent)
    actual = dict(
        y=from_devices(np.asarray(y).reshape(x_dev.shape), counts, pad_to),
        dx=from_devices(np.asarray(dx).reshape(x_dev.shape), counts, pad_to),
        scale=dparams["scale"][0, 0],
        bias=dparams["bias"][0, 0],
        stats=jax.tree.map(lambda a: np.asarray(a[0, 0]), batch_stats),
    )
    assert_matches(actual, expected, n=x.size // CHANNELS)


@pytest.mark.parametrize("api", APIS)
def test_jit_over_a_batch_sharded_input_gives_global_statistics(api):
  """No axis_name: XLA's SPMD partitioner inserts the collectives for a sharded batch."""
  mesh = jax.make_mesh((DEVICES,), ("data",))
  module = make_batchnorm(api, CHANNELS)
  torch_bn = torch.nn.BatchNorm2d(CHANNELS)
  variables = variables_from_torch(torch_bn)

  @jax.jit
  def step(variables, x, cotangent):
    def forward(x, params):
      return module.apply({**variables, "params": params}, x, use_running_average=False, mutable=["batch_stats"])

    y, vjp, updates = jax.vjp(forward, x, variables["params"], has_aux=True)
    dx, dparams = vjp(cotangent)
    return y, dx, dparams, updates["batch_stats"]

  rng = np.random.default_rng(3)
  sharding = NamedSharding(mesh, P("data"))
  for _ in range(3):
    x = random_batch(rng, (16, CHANNELS, *SPATIAL), np.float32)
    cotangent = rng.standard_normal(x.shape).astype(np.float32)
    x_dev = jax.device_put(np.moveaxis(x, 1, -1), sharding)
    y, dx, dparams, stats = step(variables, x_dev, jax.device_put(np.moveaxis(cotangent, 1, -1), sharding))
    assert len(y.sharding.device_set) == DEVICES
    expected = torch_reference(torch_bn, x, cotangent)
    actual = dict(
        y=np.moveaxis(np.asarray(y), -1, 1),
        dx=np.moveaxis(np.asarray(dx), -1, 1),
        scale=dparams["scale"],
        bias=dparams["bias"],
        stats=jax.tree.map(np.asarray, stats),
    )
    assert_matches(actual, expected, n=x.size // CHANNELS)
    variables = {**variables, "batch_stats": stats}


def test_nnx_module_updated_in_place_under_nnx_shard_map_and_nnx_jit():
  """The NNX way: the module itself goes through nnx.jit, its state replicated across the mesh;
  under nnx.shard_map with axis_name, and under nnx.jit alone over a batch-sharded input. Both
  layers' outputs and running statistics match torch on the global batch (tolerances above)."""
  mesh = jax.make_mesh((DEVICES,), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  torch_bn = torch.nn.BatchNorm2d(CHANNELS)
  synced = jaxbn.nnx.BatchNorm(CHANNELS, axis_name="data", rngs=nnx.Rngs(0))
  plain = jaxbn.nnx.BatchNorm(CHANNELS, rngs=nnx.Rngs(0))

  @nnx.jit
  def synced_step(bn, x):
    return nnx.shard_map(lambda bn, x: bn(x), mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))(bn, x)

  plain_step = nnx.jit(lambda bn, x: bn(x))
  rng = np.random.default_rng(4)
  for _ in range(3):
    x = random_batch(rng, (16, CHANNELS, *SPATIAL), np.float32)
    expected = torch_bn(to_torch(x)).detach().numpy()
    stats = variables_from_torch(torch_bn)["batch_stats"]
    for bn, step in ((synced, synced_step), (plain, plain_step)):
      y = step(bn, jax.device_put(np.moveaxis(x, 1, -1), sharding))
      np.testing.assert_allclose(np.moveaxis(np.asarray(y), -1, 1), expected, atol=ATOL, rtol=0)
      for name in ("mean", "var"):
        ours = np.asarray(getattr(bn, name)[...])
        assert np.max(np.abs(ours - stats[name]) / np.maximum(np.abs(stats[name]), 1.0)) <= STATS_RTOL, name
      assert int(bn.num_batches_tracked[...]) == int(stats["num_batches_tracked"])


def test_mask_must_broadcast_and_be_boolean():
  x = jnp.ones((4, 3, 3, 2))
  module = jaxbn.BatchNorm(use_running_average=False)
  variables = module.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"does not broadcast.*valid\[:, None, None, None\]"):
    module.apply(variables, x, mask=jnp.ones((4,), bool), mutable=["batch_stats"])
  with pytest.raises(ValueError, match="mask must be boolean"):
    module.apply(variables, x, mask=jnp.ones((4, 1, 1, 1)), mutable=["batch_stats"])


def test_torch_syncbatchnorm_state_dict_is_batchnorms():
  """convert_sync_batchnorm keeps every key, shape and dtype, so a SyncBatchNorm checkpoint loads
  into jaxbn.BatchNorm(axis_name=...) exactly like a BatchNorm one."""
  torch.manual_seed(0)
  model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
  model(torch.randn(4, 3, 6, 6))  # non-trivial running statistics
  plain = {k: v.clone() for k, v in model.state_dict().items()}
  plain_variables = variables_from_torch(model[1])
  synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces children in place
  assert isinstance(synced[1], torch.nn.SyncBatchNorm)
  sync = synced.state_dict()
  assert list(plain) == list(sync)
  for key in plain:
    assert plain[key].dtype == sync[key].dtype and torch.equal(plain[key], sync[key]), key
  jax.tree.map(np.testing.assert_array_equal, variables_from_torch(synced[1]), plain_variables)
