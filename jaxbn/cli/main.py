"""The ``jaxbn`` command's arguments, and the one place user errors become one line and status 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from jaxbn._src.errors import CheckpointError, ConversionError, PortError
from jaxbn.cli.errors import UsageError
from jaxbn.cli.models import MODEL_FORMS

# Errors that are the user's to fix; anything else is jaxbn's bug and keeps its traceback.
USER_ERRORS = (UsageError, CheckpointError, ConversionError, PortError, OSError)


class _Parser(argparse.ArgumentParser):
  """argparse, with its errors in jaxbn's form: one line, status 2 (without the usage block)."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _at_least(minimum: int):
  def parse(text: str) -> int:
    value = int(text)
    if value < minimum:
      raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value

  parse.__name__ = f"integer >= {minimum}"  # argparse names the type in its message
  return parse


def _positive_float(text: str) -> float:
  value = float(text)
  if not value > 0:
    raise argparse.ArgumentTypeError(f"must be positive, got {text}")
  return value


def parser() -> argparse.ArgumentParser:
  from jaxbn import cli

  root = _Parser(prog="jaxbn", description=cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = root.add_subparsers(dest="command", required=True)
  check = commands.add_parser("check", help="compare a torch model and its jaxbn port")
  check.add_argument("--model", default="resnet18", help=f"{MODEL_FORMS}; default resnet18")
  check.add_argument(
      "--api",
      choices=["linen", "nnx"],
      default="linen",
      help="check the Flax Linen model or the NNX one (jaxbn.port(api=...), or jaxbn.models / jaxbn.models.nnx)",
  )
  check.add_argument(
      "--emit", action="store_true", help="check jaxbn.emit's source (model.py, loaded) instead of jaxbn.port's module"
  )
  check.add_argument(
      "--layout",
      choices=["NCHW", "NHWC"],
      default="NCHW",
      help="with --emit: the source's layout, torch's (default) or channels-last (jaxbn.emit(layout=...))",
  )
  check.add_argument("--weights", help="a .pth/.safetensors state_dict for the model (default: random init)")
  check.add_argument(
      "--num-classes", type=_at_least(1), help="classes of --model (default: read from --weights, else 1000)"
  )
  check.add_argument("--steps", type=_at_least(1), default=3, help="training steps (BN statistics) before the check")
  check.add_argument(
      "--train-steps",
      type=_at_least(0),
      default=0,
      metavar="N",
      help="also jaxbn.verify: N optimiser steps in lock-step with torch (gradients, updates, statistics; default 0)",
  )
  check.add_argument("--size", type=_at_least(1), default=64, help="input height and width")
  check.add_argument("--batch", type=_at_least(1), default=4)
  check.add_argument("--seed", type=int, default=0)
  check.add_argument("--tolerance", type=_positive_float, default=1e-3, help="worst relative difference allowed")
  check.add_argument("--plot", metavar="PNG", help="draw the per-layer differences and drift (matplotlib)")
  check.add_argument("--json", metavar="FILE", help="write the result as one JSON object (the schema: README)")
  convert = commands.add_parser("convert", help="torch checkpoint <-> Flax variables")
  convert.add_argument("input")
  convert.add_argument("output")
  convert.add_argument(
      "--model",
      help=f"the model to take the Flax layout from: {MODEL_FORMS} (default:"
      " inferred from the checkpoint's names and shapes)",
  )
  convert.add_argument("--num-classes", type=_at_least(1), help="classes of --model (default: read from IN)")
  convert.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
  emit = commands.add_parser("emit", help="write a torch model as Flax source (model.py) with its weights")
  emit.add_argument("--model", required=True, help=MODEL_FORMS)
  emit.add_argument("--out", required=True, metavar="DIR", help="where model.py and model.safetensors go")
  emit.add_argument("--api", choices=["linen", "nnx"], default="linen", help="Flax Linen (default) or NNX source")
  emit.add_argument(
      "--layout",
      choices=["NCHW", "NHWC"],
      default="NCHW",
      help="torch's layout (default), or channels-last source with Flax's own Conv and Dense",
  )
  emit.add_argument("--weights", help="a .pth/.safetensors state_dict for the model (default: random init)")
  emit.add_argument(
      "--num-classes", type=_at_least(1), help="classes of --model (default: read from --weights, else 1000)"
  )
  emit.add_argument("--size", type=_at_least(1), default=224, help="the example input's height and width")
  emit.add_argument("--batch", type=_at_least(1), default=1, help="the example input's batch")
  emit.add_argument("--overwrite", action="store_true", help="replace DIR/model.py if it exists")
  inspect = commands.add_parser("inspect", help="list a checkpoint's BatchNorm layers and flag bad statistics")
  inspect.add_argument("file")
  return root


def _check_inputs_exist(args) -> None:
  """The files a command reads exist."""
  for option in ("weights", "input", "file"):
    given = getattr(args, option, None)
    if given and not os.path.exists(given):
      prefix = f"--{option} " if option == "weights" else ""
      raise UsageError(f"{prefix}{given}: no such file or directory.")


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  try:
    _check_inputs_exist(args)  # before the command's imports (torch, jax: seconds)
    command = importlib.import_module(f"jaxbn.cli.{args.command}")  # torch is imported only where needed
    status = getattr(command, args.command)(args)
    sys.stdout.flush()
    return status
  except BrokenPipeError:  # the reader left (`jaxbn inspect f.pth | head`): stop quietly, as Unix tools do
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1
  except USER_ERRORS as error:
    print(f"jaxbn {args.command}: error: {error}", file=sys.stderr)
    return 2
