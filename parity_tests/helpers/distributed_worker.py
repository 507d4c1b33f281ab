"""One process of the two-process test: joins the job, trains a few sharded steps, saves results.

  python distributed_worker.py PROCESS_ID NUM_PROCESSES PORT DATA.npz OUT.npz
Each process has 2 CPU devices; the global batch (4 devices) comes from DATA.npz, each process
feeding its own half.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

import jaxbn  # noqa: E402


def main():
  process_id, num_processes, port, data_path, out_path = sys.argv[1:]
  process_id, num_processes = int(process_id), int(num_processes)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id)
  data = np.load(data_path)
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  module = jaxbn.BatchNorm(axis_name="data")

  def device_step(params, batch_stats, x):
    y, updates = module.apply(
        {"params": params, "batch_stats": batch_stats}, x, use_running_average=False, mutable=["batch_stats"]
    )
    return y, updates["batch_stats"]

  step = jax.jit(jax.shard_map(device_step, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=(P("data"), P())))
  params = {"scale": data["scale"], "bias": data["bias"]}
  batch_stats = {"mean": data["mean"], "var": data["var"], "num_batches_tracked": np.int32(0)}
  outputs = []
  for x in data["batches"]:  # (steps, global batch, H, W, C); this process feeds its half
    rows = len(x) // num_processes
    local = x[process_id * rows : (process_id + 1) * rows]
    x_global = jax.make_array_from_process_local_data(sharding, local, x.shape)
    y, batch_stats = step(params, batch_stats, x_global)
    outputs.append(np.concatenate([np.asarray(s.data) for s in y.addressable_shards]))
  np.savez(out_path, y=np.stack(outputs), **{k: np.asarray(v) for k, v in batch_stats.items()})
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
