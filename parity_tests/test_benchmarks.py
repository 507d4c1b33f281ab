"""The benchmark scripts run end to end on tiny inputs and write well-formed tables (a smoke test
against bit rot: it checks the tables, never the timings)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

BENCHMARKS = pathlib.Path(__file__).parent.parent / "benchmarks"


def run_script(name, args, out):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as users run it
  subprocess.run(
      [sys.executable, str(BENCHMARKS / name), *args, "--out", str(out)],
      check=True,
      cwd=BENCHMARKS,
      env=env,
      capture_output=True,
      timeout=600,
  )
  return [line.strip("|").split("|") for line in out.read_text().splitlines()[4:] if line.startswith("| ")]


def test_batchnorm_bench_writes_one_row_per_mode(tmp_path):
  rows = run_script(
      "batchnorm_bench.py", ["--batch", "2", "--shapes", "2", "--dtypes", "float32", "--reps", "1"], tmp_path / "bn.md"
  )
  assert [row[2].strip() for row in rows] == ["train fwd", "train fwd+bwd", "inference"]
  for row in rows:
    assert len(row) == 11
    assert all(float(ratio) > 0 for ratio in row[5:9])  # flax fast, flax two-pass, torch x2
  jaxbn_residuals, flax_residuals = (float(v) for v in rows[1][10].split(","))
  assert 0 < jaxbn_residuals < flax_residuals


def test_resnet_step_writes_one_row_per_implementation(tmp_path):
  # the flax, port and autocast rows share the code of the rows run here (jax_step, torch_step);
  # each jaxbn row compiles a train step (~17 s): the bfloat16 model itself is test_autocast's
  arguments = "--models resnet18 --batch 2 --size 32 --reps 1 --no-compile".split()
  rows = run_script("resnet_step.py", [*arguments, "--only", "torch eager"], tmp_path / "resnet.md")
  assert [row[1].strip() for row in rows] == ["jaxbn.BatchNorm", "torch eager channels_last"]
  assert all(float(row[3]) > 0 for row in rows)  # images/s
  assert float(rows[0][4]) == 1.0  # jaxbn's time over itself
