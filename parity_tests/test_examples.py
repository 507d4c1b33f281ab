"""The examples run end to end (with fewer steps) and print what they promise."""

from __future__ import annotations

import pathlib
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
