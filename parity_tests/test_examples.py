"""The examples run end to end (with fewer steps) and print what they promise."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def run(script, *args):
  result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  return result.stdout


def test_why_jaxbn_prints_the_table():
  out = run("why_jaxbn.py", "--steps", "3")
  assert "eval output" in out and "running var (rel.)" in out and "torch: 3" in out


def test_finetune_frozen_backbone_keeps_frozen_arrays_bit_identical():
  out = run("finetune_frozen_backbone.py", "--steps", "10")
  assert out.count("bit-identical after 10 adamw steps: True") == 8


def test_data_parallel_train_syncs_statistics_over_uneven_batches():
  out = run("data_parallel_train.py", "--devices", "4", "--epochs", "1")
  assert "on 4 devices (+1 masked)" in out
  assert "max relative difference" in out


def test_nnx_finetune_frozen_backbone_keeps_frozen_arrays_bit_identical():
  out = run("nnx_finetune_frozen_backbone.py", "--steps", "5")
  assert "BatchNorm settings that differ: 0" in out
  assert "40 frozen BatchNorm arrays bit-identical after 5 adamw steps: True" in out
  assert "untrained stage arrays bit-identical after 5 adamw steps: True" in out


def test_mixed_precision_train_skips_non_finite_steps_and_keeps_float32_variables():
  out = run(
      "mixed_precision_train.py",
      "--steps",
      "5",
      "--initial-scale",
      "131072",
      "--size",
      "16",
      "--blocks",
      "1",
      "1",
      "1",
      "1",
  )
  skipped, scale = re.search(r"skipped \(non-finite gradients\): (\d+), loss scale now (\S+)", out).groups()
  assert 1 <= int(skipped) < 5, out  # the scale starts too high for float16 and backs off
  assert float(scale) == 131072 * 0.5 ** int(skipped)  # halved per skipped step; growth needs 2000 finite ones
  assert "parameters and optimizer state unchanged on every skipped step: True" in out
  assert "variables after training: float32; running statistics finite: True" in out
