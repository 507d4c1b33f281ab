"""The ``jaxbn`` command: ``jaxbn check`` and ``jaxbn convert``.

  jaxbn check [--model MODEL] [--weights PATH] [--steps 3] [--size 64] [--batch 4] [--plot PNG]
      torch model (random init, or weights from PATH) -> BN statistics trained briefly ->
      saved as .safetensors -> loaded and converted -> per-BatchNorm-layer comparison of torch and
      jaxbn in training and eval, BN configuration check, timings. Exit status 1 when the worst
      relative difference exceeds --tolerance. MODEL: a ResNet name (resnet18, ...: jaxbn.models),
      or any model through jaxbn.port: torchvision:NAME, timm:NAME, path/to/file.py:factory; for
      those, also what a port with flax.linen.BatchNorm would get wrong.

  jaxbn convert IN OUT [--model MODEL] [--overwrite]
      torch checkpoint (.pth/.pt/.bin/.safetensors, dotted keys) -> Flax variables: an orbax
      checkpoint directory (OUT without a suffix), .msgpack (flax.serialization), or .safetensors
      with 'params/...' keys; and any of those -> torch (.pth/.safetensors). Without --model,
      Flax shapes are inferred from torch names (see convert.template_from_state_dict). The
      BatchNorm configuration (eps, momentum, ...) recorded in IN, or else --model's, is written
      with OUT and checked against --model.

  jaxbn inspect FILE
      every BatchNorm layer in a checkpoint (torch or Flax): channels, counter, recorded
      configuration, and running statistics that look wrong. Exit status 1 if any does.

A user error (a missing file, a checkpoint that does not fit the model, an existing output)
prints one line naming the problem and the fix, and exits with status 2.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys
import tempfile
import time

import numpy as np

LARGE_CHECKPOINT_BYTES = 50 * 2**20  # progress bars above this


class UsageError(Exception):
  """A user mistake: reported as one line and exit status 2, without a traceback."""


def _does_not_fit(source, what: str, missing, unexpected, mismatched, fix: str) -> UsageError:
  example = (mismatched or unexpected or missing)[0]
  return UsageError(f"{source} does not fit {what}: {len(missing)} missing, {len(unexpected)} unexpected and"
                    f" {len(mismatched)} wrongly shaped tensors (e.g. {example}). {fix}")


def _progress(total_bytes: int, description: str):
  if total_bytes < LARGE_CHECKPOINT_BYTES:
    return None
  from tqdm import tqdm

  return lambda items: tqdm(list(items), desc=description, unit="tensor", file=sys.stderr)


MODEL_FORMS = ("a jaxbn.models ResNet name (resnet18, ...), torchvision:NAME, timm:NAME or path/to/file.py:factory")


def torch_model_from_spec(spec: str, num_classes: int):
  """The torch model a ``--model`` names, and whether jaxbn.port builds its Flax twin (else it is
  one of jaxbn.models' ResNets)."""
  import torchvision

  from jaxbn.models import MODELS

  if spec in MODELS:
    return getattr(torchvision.models, spec)(num_classes=num_classes), False
  source, _, name = spec.partition(":")
  if not name:
    raise UsageError(f"--model {spec!r}: give {MODEL_FORMS}.")
  if source == "torchvision":
    builder = getattr(torchvision.models, name, None) or getattr(torchvision.models.detection, name, None)
    if builder is None:
      raise UsageError(f"torchvision.models has no {name!r}; see torchvision.models.list_models().")
    return builder(num_classes=num_classes), True
  if source == "timm":
    try:
      import timm
    except ImportError as error:
      raise UsageError("--model timm:... needs timm: pip install timm (or jaxbn[test]).") from error
    if name not in timm.list_models():
      raise UsageError(f"timm has no model {name!r}; see timm.list_models().")
    return timm.create_model(name, pretrained=False, num_classes=num_classes), True
  path = pathlib.Path(source)
  if path.suffix != ".py" or not path.exists():
    raise UsageError(f"--model {spec!r}: {source} is not a .py file; give {MODEL_FORMS}.")
  import importlib.util

  module_spec = importlib.util.spec_from_file_location(path.stem, path)
  user_module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(user_module)
  factory = getattr(user_module, name, None)
  if not callable(factory):
    raise UsageError(f"{path} has no function {name!r} that builds the torch model.")
  return factory(), True


def check(args) -> int:
  import jax
  import torch

  import jaxbn
  from jaxbn._src import layer_config
  from jaxbn._src.checkpoint import numpy_to_torch, state_dict_to_numpy
  from jaxbn._src.inspection import inspect_state_dict

  torch.manual_seed(args.seed)
  torch_model, ported = torch_model_from_spec(args.model, args.num_classes)
  if ported and args.api == "nnx":
    raise UsageError("--api nnx checks the jaxbn.models.nnx ResNets; a model from jaxbn.port is a Linen module.")
  if ported:
    jaxbn.parity.without_dropout(torch_model)  # torch's random masks cannot be reproduced
  if args.weights:
    weights = jaxbn.load_state_dict(args.weights)
    expected = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    mismatched = [f"{k} {tuple(weights[k].shape)} != {expected[k]}" for k in sorted(weights.keys() & expected.keys())
                  if tuple(weights[k].shape) != expected[k]]
    if missing or unexpected or mismatched:
      raise _does_not_fit(args.weights, f"{args.model}(num_classes={args.num_classes})", missing,
                          unexpected, mismatched, "Pass the --model the weights were saved from, and its --num-classes.")
    torch_model.load_state_dict(numpy_to_torch(weights), strict=True)
  rng = np.random.default_rng(args.seed)

  def batch():
    return rng.standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)

  torch_model.train()
  with torch.no_grad():  # only the BatchNorm statistics move
    for _ in range(args.steps):
      torch_model(torch.from_numpy(batch()))
  print(f"{args.model}: {'weights from ' + args.weights if args.weights else 'random init'},"
        f" BatchNorm statistics trained for {args.steps} steps on {args.batch}x3x{args.size}x{args.size} batches"
        + ("; ported with jaxbn.port, dropout and stochastic depth off (p=0)" if ported else ""))

  timings = {}
  with tempfile.TemporaryDirectory() as directory:
    path = pathlib.Path(directory) / f"{args.model}.safetensors"
    jaxbn.save_state_dict(torch_model, path)  # the BatchNorm configuration is recorded with it
    start = time.perf_counter()
    state_dict = jaxbn.load_state_dict(path)
    timings["load .safetensors"] = time.perf_counter() - start
    recorded = jaxbn.read_batchnorm_config(path)
  x = batch()
  flax_input = x if ported else np.moveaxis(x, 1, -1)
  naive = None
  if ported:
    start = time.perf_counter()
    model, variables = jaxbn.port(torch_model, x)
    timings["jaxbn.port (trace, build, convert)"] = time.perf_counter() - start
    variables = jaxbn.convert.from_torch(state_dict, variables).variables  # the weights from the file
    eval_fn = jax.jit(model.apply)
    naive = flax_linen_port_errors(copy.deepcopy(torch_model), model, variables, args)
  elif args.api == "nnx":
    from flax import nnx

    start = time.perf_counter()
    model = jaxbn.models.nnx.MODELS[args.model](args.num_classes, rngs=nnx.Rngs(0))
    timings["build the NNX module"] = time.perf_counter() - start
    start = time.perf_counter()
    jaxbn.convert.from_torch(state_dict, model)  # in place
    timings["convert (rules)"] = time.perf_counter() - start
    variables = None  # compare runs the module's own state, leaving it as it is
    model.eval()
    forward = nnx.jit(lambda model, x: model(x))
    eval_fn = lambda _, x: forward(model, x)  # noqa: E731
  else:
    model = jaxbn.models.MODELS[args.model](num_classes=args.num_classes)
    start = time.perf_counter()
    template = jax.eval_shape(model.init, jax.random.key(0), flax_input)
    timings["template (jax.eval_shape of init)"] = time.perf_counter() - start
    start = time.perf_counter()
    variables = jaxbn.convert.from_torch(state_dict, template).variables
    timings["convert (rules)"] = time.perf_counter() - start
    eval_fn = jax.jit(lambda v, x: model.apply(v, x))

  mismatches = layer_config.mismatches(recorded, layer_config.flax_configs(model, flax_input))
  print("BatchNorm configuration recorded in the checkpoint (eps, momentum, affine, tracking):",
        "all layers match" if not mismatches else "")
  for m in mismatches:
    print(f"  {m.layer}: {m.field} torch={m.torch} flax={m.flax}")

  batches = [batch() for _ in range(args.steps + 1)]
  start = time.perf_counter()
  report = jaxbn.parity.compare(torch_model, model, variables, batches, train_steps=args.steps,
                                channels_last=not ported)
  timings["compare (both frameworks, incl. compilation)"] = time.perf_counter() - start
  print(f"\nPer BatchNorm layer, max |jaxbn - torch| / max |torch output| over {args.steps} training"
        " steps and 1 eval step; drift: running statistics relative to max(|value|, 1)")
  print(jaxbn.parity.format_table(report))
  if naive is not None:
    print(naive)
  if args.plot:
    plot_report(report, args.plot, args.model)
    print(f"\nPlot of the per-layer differences: {args.plot}")

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
  # NaN compares False with any tolerance: non-finite statistics or differences fail by name.
  corrupted = [f"{framework} {layer.layer}: {problem}"
               for framework, state in (("checkpoint", state_dict), ("torch after the check",
                                                                     state_dict_to_numpy(torch_model.state_dict())))
               for layer in inspect_state_dict(state) for problem in layer.problems if "non-finite" in problem]
  corrupted += sorted({f"jaxbn {row.layer}: non-finite output or running statistics ({row.mode}, step {row.step})"
                       for row in report if not np.all(np.isfinite([row.max_rel, row.mean_drift or 0, row.var_drift or 0]))})
  if corrupted:
    print("\nFAILED: non-finite running statistics:\n  " + "\n  ".join(corrupted))
    return 1
  if worst > args.tolerance:
    print(f"\nFAILED: worst relative difference {worst:.2e} > tolerance {args.tolerance:.0e}")
    return 1
  print(f"\nOK: worst relative difference {worst:.2e} <= tolerance {args.tolerance:.0e}")
  return 0


def flax_linen_port_errors(torch_model, module, variables, args) -> str:
  """What the same port built with flax.linen.BatchNorm would get wrong: momentum translated to
  flax's convention (1 - m), flax's default epsilon and its biased running variance. Trained on
  the same batches as torch (no gradient steps), then compared in eval mode."""
  import flax.linen as nn
  import jax
  import torch
  from flax import traverse_util

  from jaxbn._src.port.leaves import Leaf, activated

  configs = module.batchnorm_layers()
  eps_traps = sorted(path for path, layer in configs.items() if layer.epsilon != 1e-5)
  momentum_traps = sorted(path for path, layer in configs.items() if layer.momentum != 0.1)

  def flax_batchnorm(path, leaf):
    layer = leaf.prototype
    if path not in configs:
      return leaf
    fields = dict(axis=1, momentum=1 - (layer.momentum or 0.1), use_scale=layer.use_scale, use_bias=layer.use_bias,
                  param_dtype=layer.param_dtype)
    after = getattr(layer, "after", ())  # timm's BatchNormAct2d activation
    return Leaf(activated(nn.BatchNorm)(**fields, after=after) if after else nn.BatchNorm(**fields),
                "use_running_average")

  naive = module.clone(leaves=tuple((path, flax_batchnorm(path, leaf)) for path, leaf in module.leaves))
  stats = traverse_util.flatten_dict(variables.get("batch_stats", {}))
  naive_variables = {**variables, "batch_stats": traverse_util.unflatten_dict(
      {k: v for k, v in stats.items() if k[-1] != "num_batches_tracked"})}  # flax keeps no counter
  train = jax.jit(lambda v, x: naive.apply(v, x, train=True, mutable=["batch_stats"]))
  rng = np.random.default_rng(args.seed + 1)

  def batch():
    return rng.standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)

  torch_model.train()
  for _ in range(args.steps):
    x = batch()
    naive_variables = {**naive_variables, **train(naive_variables, x)[1]}
    with torch.no_grad():
      torch_model(torch.from_numpy(x))
  x = batch()
  torch_model.eval()
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(x)).numpy()
  output = np.asarray(jax.jit(naive.apply)(naive_variables, x))
  ours = traverse_util.flatten_dict(naive_variables["batch_stats"], sep="/")
  drift = max(float(np.max(np.abs(ours[f"{path.replace('.', '/')}/var"] - layer.running_var.numpy())
                           / np.maximum(np.abs(layer.running_var.numpy()), 1.0)))
              for path, layer in torch_model.named_modules() if f"{path.replace('.', '/')}/var" in ours)
  example = f" (e.g. {eps_traps[0]}: eps={configs[eps_traps[0]].epsilon:g})" if eps_traps else ""
  return (f"\nThe same port with flax.linen.BatchNorm (momentum translated to 1 - m; flax's default epsilon 1e-5;"
          f" biased running variance), after the same {args.steps} training steps:\n"
          f"  torch sets eps != 1e-5 in {len(eps_traps)} of {len(configs)} BatchNorm layers{example},"
          f" momentum != 0.1 in {len(momentum_traps)}\n"
          f"  eval output: worst relative difference {np.max(np.abs(output - expected)) / np.max(np.abs(expected)):.2e};"
          f" running variance drift {drift:.2e}  (jaxbn: the table above)")


def plot_report(report, path: str, title: str) -> None:
  """Per BatchNorm layer (in model order): worst train and eval output differences and running
  statistic drift, on a log scale."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError as error:
    raise UsageError("--plot needs matplotlib: pip install 'jaxbn[plot]' (or matplotlib).") from error
  layers = list(dict.fromkeys(row.layer for row in report))
  index = {name: i for i, name in enumerate(layers)}
  series = {"train output": [0.0] * len(layers), "eval output": [0.0] * len(layers),
            "running mean drift": [0.0] * len(layers), "running var drift": [0.0] * len(layers)}
  for row in report:
    i = index[row.layer]
    key = "train output" if row.mode == "train" else "eval output"
    series[key][i] = max(series[key][i], row.max_rel)
    for name, value in (("running mean drift", row.mean_drift), ("running var drift", row.var_drift)):
      if value is not None:
        series[name][i] = max(series[name][i], value)
  figure, axes = plt.subplots(figsize=(max(6, len(layers) * 0.12), 4))
  floor = 1e-12  # zeros drawn at the floor of the log scale
  for name, values in series.items():
    axes.semilogy(range(len(layers)), [max(v, floor) for v in values], ".-", label=name, linewidth=0.8)
  axes.set_xlabel("BatchNorm layer (model order)")
  axes.set_ylabel("relative difference, jaxbn vs torch")
  axes.set_title(f"{title}: per-layer parity")
  axes.legend(fontsize="small")
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def _is_flax_file(path: pathlib.Path) -> bool:
  if path.suffix == ".msgpack" or path.is_dir():
    return True
  if path.suffix == ".safetensors":
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
      return any("/" in key for key in f.keys())
  return False


def _read_flax(source: pathlib.Path) -> dict:
  """Flax variables from an orbax directory, .msgpack or a '/'-keyed .safetensors file."""
  from flax import serialization, traverse_util

  import jaxbn

  if source.is_dir():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(source.resolve())
  if source.suffix == ".msgpack":
    return serialization.msgpack_restore(source.read_bytes())
  return traverse_util.unflatten_dict(jaxbn.load_state_dict(source), sep="/")


def _write_flax(variables: dict, target: pathlib.Path, configs) -> None:
  """Flax variables to an orbax directory (no suffix), .msgpack or .safetensors, with the
  BatchNorm configuration in the safetensors header or in a batchnorm.json beside the others."""
  import jax
  from flax import serialization, traverse_util

  import jaxbn
  from jaxbn._src.checkpoint import config_sidecar
  from jaxbn._src.layer_config import METADATA_KEY, to_metadata

  if target.suffix == ".safetensors":
    jaxbn.save_state_dict(traverse_util.flatten_dict(variables, sep="/"), target, batchnorm_config=configs)
    return
  arrays = jax.tree.map(np.asarray, variables)
  if not target.suffix:
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target.resolve(), arrays, force=True)
    checkpointer.wait_until_finished()
  elif target.suffix == ".msgpack":
    target.write_bytes(serialization.msgpack_serialize(arrays))
  else:
    raise UsageError(f"write Flax variables to an orbax directory (OUT without a suffix), .msgpack or .safetensors,"
                     f" not {target.suffix!r}.")
  sidecar = config_sidecar(target)
  if configs:
    sidecar.write_text(to_metadata(configs)[METADATA_KEY])
  elif sidecar.exists():  # from an overwritten conversion
    sidecar.unlink()


def convert(args) -> int:
  import jax

  import jaxbn
  from jaxbn._src import layer_config

  source, target = pathlib.Path(args.input), pathlib.Path(args.output)
  if not source.exists():
    raise UsageError(f"{source}: no such file or directory.")
  if target.exists() and not args.overwrite:
    raise UsageError(f"{target} exists already; pass --overwrite to replace it, or choose another OUT.")
  size = source.stat().st_size if source.is_file() else sum(f.stat().st_size for f in source.rglob("*") if f.is_file())
  recorded = jaxbn.read_batchnorm_config(source)
  if _is_flax_file(source):  # Flax -> torch
    state_dict = jaxbn.convert.to_state_dict(_read_flax(source), progress=_progress(size, "converting"))
    jaxbn.save_state_dict(state_dict, target, batchnorm_config=recorded)
    print(f"{source} (Flax variables) -> {target}: {len(state_dict)} torch tensors")
    return 0

  state_dict = jaxbn.load_state_dict(source)
  configs = recorded
  if args.model:
    fc = state_dict.get("fc.weight")
    num_classes = args.num_classes or (fc.shape[0] if fc is not None else 1000)
    torch_model, ported = torch_model_from_spec(args.model, num_classes)
    if ported:  # the Flax layout from jaxbn.port (traced, nothing computed at this size)
      x = np.zeros((1, 3, 224, 224), np.float32)
      model, template = jaxbn.port(torch_model, x, strict=False)
    else:
      model = jaxbn.models.MODELS[args.model](num_classes=num_classes)
      x = np.zeros((1, 64, 64, 3), np.float32)
      template = jax.eval_shape(model.init, jax.random.key(0), x)
  else:
    template = jaxbn.convert.template_from_state_dict(state_dict)
  converted = jaxbn.convert.from_torch(state_dict, template, strict=False, progress=_progress(size, "converting"))
  if converted.missing or converted.unexpected or converted.mismatched:
    mismatched = [f"{key} {shape}" for key, shape, *_ in converted.mismatched]
    raise _does_not_fit(source, args.model or "the layout inferred from its names", converted.missing, converted.unexpected, mismatched,
                        "Pass the --model the checkpoint was saved from, or leave --model out to take the layout"
                        " from the checkpoint.")
  if args.model:
    model_configs = layer_config.flax_configs(model, x)
    if recorded is not None:
      layer_config.check(recorded, model_configs, source=str(source))
    configs = recorded or model_configs
  _write_flax(converted.variables, target, configs)
  print(f"{source} (torch state_dict) -> {target}: {len(jax.tree.leaves(converted.variables))} Flax arrays"
        + (f", BatchNorm configuration of {len(configs)} layers recorded" if configs else ""))
  return 0


def inspect(args) -> int:
  import jaxbn
  from jaxbn._src.inspection import inspect_state_dict

  source = pathlib.Path(args.file)
  if not source.exists():
    raise UsageError(f"{source}: no such file or directory.")
  state_dict = (jaxbn.convert.to_state_dict(_read_flax(source)) if _is_flax_file(source)
                else jaxbn.load_state_dict(source))
  configs = jaxbn.read_batchnorm_config(source) or {}
  layers = inspect_state_dict(state_dict)
  print(f"{source}: {len(state_dict)} tensors, {len(layers)} BatchNorm layers;"
        f" configuration {'recorded' if configs else 'not recorded (eps and momentum unknown)'}")
  width = max([len(layer.layer) for layer in layers] + [5])
  print(f"{'layer':<{width}}  {'channels':>8}  {'batches':>8}  {'class':<15}  {'eps':>7}  {'momentum':>8}  problems")
  for layer in layers:
    config = configs.get(layer.layer)
    counter = "-" if layer.num_batches_tracked is None else str(layer.num_batches_tracked)
    kind, eps, momentum = (config.kind, f"{config.eps:g}", str(config.momentum)) if config else ("?", "?", "?")
    print(f"{layer.layer:<{width}}  {layer.channels:>8}  {counter:>8}  {kind:<15}  {eps:>7}  {momentum:>8}"
          f"  {'; '.join(layer.problems) or 'ok'}")
  suspicious = [layer.layer for layer in layers if layer.problems]
  if suspicious:
    print(f"\n{len(suspicious)} layer(s) with suspicious running statistics: {', '.join(suspicious)}")
    return 1
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="jaxbn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  check_parser = commands.add_parser("check", help="compare a torch model and its jaxbn port")
  check_parser.add_argument("--model", default="resnet18", help=f"{MODEL_FORMS}; default resnet18")
  check_parser.add_argument("--api", choices=["linen", "nnx"], default="linen",
                            help="check the Flax Linen model (jaxbn.models) or the NNX one (jaxbn.models.nnx)")
  check_parser.add_argument("--weights", help="a .pth/.safetensors state_dict for the model (default: random init)")
  check_parser.add_argument("--num-classes", type=int, default=1000)
  check_parser.add_argument("--steps", type=int, default=3, help="training steps (BN statistics) before the check")
  check_parser.add_argument("--size", type=int, default=64, help="input height and width")
  check_parser.add_argument("--batch", type=int, default=4)
  check_parser.add_argument("--seed", type=int, default=0)
  check_parser.add_argument("--tolerance", type=float, default=1e-3, help="worst relative difference allowed")
  check_parser.add_argument("--plot", metavar="PNG", help="draw the per-layer differences and drift (matplotlib)")
  convert_parser = commands.add_parser("convert", help="torch checkpoint <-> Flax variables")
  convert_parser.add_argument("input")
  convert_parser.add_argument("output")
  convert_parser.add_argument("--model", help=f"the model to take the Flax layout from: {MODEL_FORMS} (default:"
                              " inferred from the checkpoint's names and shapes)")
  convert_parser.add_argument("--num-classes", type=int, help="classes of --model (default: a ResNet's fc, else 1000)")
  convert_parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
  inspect_parser = commands.add_parser("inspect", help="list a checkpoint's BatchNorm layers and flag bad statistics")
  inspect_parser.add_argument("file")
  args = parser.parse_args(argv)
  from jaxbn._src.checkpoint import CheckpointError
  from jaxbn._src.convert import ConversionError  # ConfigMismatchError too

  try:
    return {"check": check, "convert": convert, "inspect": inspect}[args.command](args)
  except Exception as error:
    port = sys.modules.get("jaxbn._src.port.graph")  # loaded (with torch) only if the port ran
    user_errors = (UsageError, CheckpointError, ConversionError, OSError) + ((port.PortError,) if port else ())
    if not isinstance(error, user_errors):
      raise
    print(f"jaxbn {args.command}: error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
