"""The ``jaxbn`` command: ``jaxbn check`` and ``jaxbn convert``.

  jaxbn check [--model resnet18] [--weights PATH] [--steps 3] [--size 64] [--batch 4]
      torchvision model (random init, or weights from PATH) -> BN statistics trained briefly ->
      saved as .safetensors -> loaded and converted -> per-BatchNorm-layer comparison of torch and
      jaxbn in training and eval, BN configuration check, timings. Exit status 1 when the worst
      relative difference exceeds --tolerance.

  jaxbn convert IN OUT [--model NAME]
      torch checkpoint (.pth/.pt/.bin/.safetensors, dotted keys) -> Flax variables: an orbax
      checkpoint directory (OUT without a suffix), .msgpack (flax.serialization), or .safetensors
      with 'params/...' keys; and any of those -> torch (.pth/.safetensors). Without --model,
      Flax shapes are inferred from torch names (see convert.template_from_state_dict).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np

LARGE_CHECKPOINT_BYTES = 50 * 2**20  # progress bars above this


def _progress(total_bytes: int, description: str):
  if total_bytes < LARGE_CHECKPOINT_BYTES:
    return None
  from tqdm import tqdm

  return lambda items: tqdm(list(items), desc=description, unit="tensor", file=sys.stderr)


def check(args) -> int:
  import jax
  import torch
  import torchvision

  import jaxbn
  import jaxbn.parity
  from jaxbn._src.checkpoint import numpy_to_torch, state_dict_to_numpy

  torch.manual_seed(args.seed)
  torch_model = getattr(torchvision.models, args.model)(num_classes=args.num_classes)
  if args.weights:
    torch_model.load_state_dict(numpy_to_torch(jaxbn.load_state_dict(args.weights)), strict=True)
  rng = np.random.default_rng(args.seed)

  def batch():
    return rng.standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)

  torch_model.train()
  with torch.no_grad():  # only the BatchNorm statistics move
    for _ in range(args.steps):
      torch_model(torch.from_numpy(batch()))
  print(f"{args.model}: {'weights from ' + args.weights if args.weights else 'random init'},"
        f" BatchNorm statistics trained for {args.steps} steps on {args.batch}x3x{args.size}x{args.size} batches")

  timings = {}
  with tempfile.TemporaryDirectory() as directory:
    path = pathlib.Path(directory) / f"{args.model}.safetensors"
    jaxbn.save_state_dict(state_dict_to_numpy(torch_model.state_dict()), path)
    start = time.perf_counter()
    state_dict = jaxbn.load_state_dict(path)
    timings["load .safetensors"] = time.perf_counter() - start
  model = jaxbn.models.MODELS[args.model](num_classes=args.num_classes)
  x = batch()
  start = time.perf_counter()
  template = jax.eval_shape(model.init, jax.random.key(0), np.moveaxis(x, 1, -1))
  timings["template (jax.eval_shape of init)"] = time.perf_counter() - start
  start = time.perf_counter()
  variables = jaxbn.convert.from_torch(state_dict, template).variables
  timings["convert (rules)"] = time.perf_counter() - start

  mismatches = jaxbn.parity.compare_config(torch_model, model, np.moveaxis(x, 1, -1))
  print("BatchNorm configuration (eps, momentum, affine, tracking):",
        "all layers match" if not mismatches else "")
  for m in mismatches:
    print(f"  {m.layer}: {m.field} torch={m.torch} flax={m.flax}")

  batches = [batch() for _ in range(args.steps + 1)]
  start = time.perf_counter()
  report = jaxbn.parity.compare(torch_model, model, variables, batches, train_steps=args.steps)
  timings["compare (both frameworks, incl. compilation)"] = time.perf_counter() - start
  print(f"\nPer BatchNorm layer, max |jaxbn - torch| / max |torch output| over {args.steps} training"
        " steps and 1 eval step; drift: running statistics relative to max(|value|, 1)")
  print(jaxbn.parity.format_table(report))

  eval_fn = jax.jit(lambda v, x: model.apply(v, x))
  flax_input = np.moveaxis(x, 1, -1)
  eval_fn(variables, flax_input).block_until_ready()
  torch_model.eval()
  for name, run in (("eval forward, jaxbn (jitted)", lambda: eval_fn(variables, flax_input).block_until_ready()),
                    ("eval forward, torch", lambda: torch_model(torch.from_numpy(x)))):
    runs = []
    for _ in range(5):
      start = time.perf_counter()
      with torch.no_grad():
        run()
      runs.append(time.perf_counter() - start)
    timings[name] = float(np.median(runs))
  print("\nTimings (this machine):")
  for name, seconds in timings.items():
    print(f"  {name:<46} {seconds * 1e3:9.1f} ms")
  worst = max(row.max_rel for row in report)
  if worst > args.tolerance:
    print(f"\nFAILED: worst relative difference {worst:.2e} > tolerance {args.tolerance:.0e}")
    return 1
  print(f"\nOK: worst relative difference {worst:.2e} <= tolerance {args.tolerance:.0e}")
  return 0


def _is_flax_file(path: pathlib.Path) -> bool:
  if path.suffix == ".msgpack" or path.is_dir():
    return True
  if path.suffix == ".safetensors":
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
      return any("/" in key for key in f.keys())
  return False


def convert(args) -> int:
  import jax
  from flax import serialization, traverse_util

  import jaxbn

  source, target = pathlib.Path(args.input), pathlib.Path(args.output)
  size = source.stat().st_size if source.is_file() else sum(f.stat().st_size for f in source.rglob("*") if f.is_file())
  if _is_flax_file(source):  # Flax -> torch
    if source.is_dir():
      import orbax.checkpoint as ocp

      variables = ocp.StandardCheckpointer().restore(source.resolve())
    elif source.suffix == ".msgpack":
      variables = serialization.msgpack_restore(source.read_bytes())
    else:
      variables = traverse_util.unflatten_dict(jaxbn.load_state_dict(source), sep="/")
    state_dict = jaxbn.convert.to_state_dict(variables, progress=_progress(size, "converting"))
    jaxbn.save_state_dict(state_dict, target)
    print(f"{source} (Flax variables) -> {target}: {len(state_dict)} torch tensors")
    return 0

  state_dict = jaxbn.load_state_dict(source)
  if args.model:
    fc = state_dict.get("fc.weight")
    model = jaxbn.models.MODELS[args.model](num_classes=fc.shape[0] if fc is not None else 1000)
    template = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32))
  else:
    template = jaxbn.convert.template_from_state_dict(state_dict)
  variables = jaxbn.convert.from_torch(state_dict, template, progress=_progress(size, "converting")).variables
  if not target.suffix:
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target.resolve(), jax.tree.map(np.asarray, variables))
    checkpointer.wait_until_finished()
  elif target.suffix == ".msgpack":
    target.write_bytes(serialization.msgpack_serialize(jax.tree.map(np.asarray, variables)))
  elif target.suffix == ".safetensors":
    jaxbn.save_state_dict(traverse_util.flatten_dict(variables, sep="/"), target)
  else:
    raise SystemExit(f"jaxbn convert: write Flax variables to an orbax directory (no suffix), .msgpack or"
                     f" .safetensors, not {target.suffix!r}")
  print(f"{source} (torch state_dict) -> {target}: {len(jax.tree.leaves(variables))} Flax arrays")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="jaxbn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  check_parser = commands.add_parser("check", help="compare a torchvision model and its jaxbn port")
  check_parser.add_argument("--model", default="resnet18", choices=["resnet18", "resnet34", "resnet50", "resnet101",
                                                                    "resnet152", "resnext50_32x4d", "wide_resnet50_2"])
  check_parser.add_argument("--weights", help="a .pth/.safetensors state_dict for the model (default: random init)")
  check_parser.add_argument("--num-classes", type=int, default=1000)
  check_parser.add_argument("--steps", type=int, default=3, help="training steps (BN statistics) before the check")
  check_parser.add_argument("--size", type=int, default=64, help="input height and width")
  check_parser.add_argument("--batch", type=int, default=4)
  check_parser.add_argument("--seed", type=int, default=0)
  check_parser.add_argument("--tolerance", type=float, default=1e-3, help="worst relative difference allowed")
  convert_parser = commands.add_parser("convert", help="torch checkpoint <-> Flax variables")
  convert_parser.add_argument("input")
  convert_parser.add_argument("output")
  convert_parser.add_argument("--model", help="a jaxbn.models name to take the Flax layout from")
  args = parser.parse_args(argv)
  return check(args) if args.command == "check" else convert(args)


if __name__ == "__main__":
  sys.exit(main())
