"""Two processes (jax.distributed on localhost, CPU collectives over gloo, 2 devices each) train
jaxbn.BatchNorm with axis_name over their 4 devices and get exactly what torch BatchNorm gives on
the concatenated global batch. Tolerances: outputs 2e-6, running statistics 5e-7 relative."""

from __future__ import annotations

import pathlib
import socket
import subprocess
import sys

import numpy as np
import torch

from parity_tests.torch_reference import random_batch, variables_from_torch

WORKER = pathlib.Path(__file__).parent / "helpers" / "distributed_worker.py"
PROCESSES, STEPS = 2, 3


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_torch_on_the_global_batch(tmp_path):
  rng = np.random.default_rng(0)
  batches = np.stack([random_batch(rng, (8, 3, 4, 5), np.float32) for _ in range(STEPS)])  # NCHW
  torch_bn = torch.nn.BatchNorm2d(3)
  with torch.no_grad():
    torch_bn.weight.copy_(torch.tensor([0.5, 1.0, 1.5]))
    torch_bn.bias.copy_(torch.tensor([-1.0, 0.0, 1.0]))
  start = variables_from_torch(torch_bn)
  np.savez(
      tmp_path / "data.npz",
      batches=np.moveaxis(batches, 2, -1),
      **start["params"],
      mean=start["batch_stats"]["mean"],
      var=start["batch_stats"]["var"],
  )
  expected = [torch_bn(torch.from_numpy(x)).detach().numpy() for x in batches]

  port = str(free_port())
  workers = [
      subprocess.Popen(
          [
              sys.executable,
              str(WORKER),
              str(i),
              str(PROCESSES),
              port,
              str(tmp_path / "data.npz"),
              str(tmp_path / f"out{i}.npz"),
          ],
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(PROCESSES)
  ]
  for worker in workers:
    output, _ = worker.communicate(timeout=240)
    assert worker.returncode == 0, output[-3000:]

  results = [np.load(tmp_path / f"out{i}.npz") for i in range(PROCESSES)]
  y = np.concatenate([r["y"] for r in results], axis=1)  # each process holds its half
  np.testing.assert_allclose(np.moveaxis(y, -1, 2), np.stack(expected), atol=2e-6, rtol=0)
  for result in results:
    for name, buffer in (("mean", torch_bn.running_mean), ("var", torch_bn.running_var)):
      np.testing.assert_allclose(result[name], buffer.numpy(), rtol=5e-7, atol=5e-7)
    assert int(result["num_batches_tracked"]) == STEPS
