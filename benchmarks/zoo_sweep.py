"""The port's coverage of the zoos: the smallest BatchNorm model of every timm architecture
module (chosen here from ``timm.list_modules()`` / ``timm.list_models()``, not from a list) and
every torchvision classification, segmentation, video and detection-backbone model that uses
BatchNorm; with ``--zoo``, the BatchNorm models of Hugging Face transformers, ultralytics and
segmentation_models_pytorch (the ``sweep`` extra), enumerated from each library. Each model goes
through ``jaxbn.verify`` (the public check: conversion round trip, eval, a float32 step from
identical parameters, float64 lock-step with torch: gradients, updates, statistics) in its own
process with a timeout.

  python benchmarks/zoo_sweep.py [--out zoo-cpu.md] [--zoo timm|torchvision|transformers|ultralytics|smp|all]
                                 [--only timm:NAME smp:Unet/resnet18 ultralytics:yolov8n ...] [--timeout 600]

Random init, as each library draws it, except BatchNorm weights a library draws around 0 (transformers'
RT-DETR family): redrawn N(1, 0.2), as trained weights are (``unshrunk_batchnorms``; the row says so).

Status per model: pass; mismatch (a tolerance failed: a wrong number, the worst outcome);
refused (jaxbn.PortError, with its first reason); failed (any other error); timeout.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import json
import pathlib
import subprocess
import sys
import time
import traceback
import unittest.mock

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZE = {"video": (2, 3, 4, 64, 64), "inception": (2, 3, 96, 96)}  # input shape by need; default 2x3x64x64

# transformers models whose default config does not fit this machine or does not run in torch,
# with the config a checkpoint of them uses (or the small one of the family), and models whose
# input is not an RGB image: each with why.
TRANSFORMERS_CONFIGS = {
    # the default is EfficientNet-B7 at 600 px (killed for memory at 24 GiB): B0's coefficients at 64 px
    "EfficientNet": {"width_coefficient": 1.0, "depth_coefficient": 1.0, "image_size": 64, "hidden_dim": 1280},
    "AlignVision": {"width_coefficient": 1.0, "depth_coefficient": 1.0, "image_size": 64, "hidden_dim": 1280},
    # the config's own default backbone spells "archirecture" (transformers 5.25): timm's resnet50,
    # whose channels the neck does not take; repvit_m1 as EdgeTAM's checkpoints
    # and at 256 px (its default, 1024, was killed for memory at 24 GiB): the feature sizes its mask
    # decoder and prompt encoder expect, a quarter of the default's
    "EdgeTam": {
        "vision_config": {"backbone_config": "repvit_m1", "backbone_feature_sizes": [[64, 64], [32, 32], [16, 16]]},
        "prompt_encoder_config": {"image_size": 256},
    },
    "EdgeTamVision": {"backbone_config": "repvit_m1"},
    # __post_init__ falls back to pp_lcnet_v4 (a recogniser's backbone: strides in height only), not the
    # pp_lcnet_v3 (scale 0.75) its sub_configs_defaults name; the neck's default in-channels (12, 18, 42,
    # 360) are Paddle's extra det-mode projections, which transformers' backbone lacks: its channels instead
    "PPOCRV6SmallDet": {"backbone_config": "sub_configs_defaults", "layer_list_out_channels": [48, 96, 192, 384]},
    # the head concatenates all six bridge stages; the backbone's default puts out the last only
    "UVDoc": {"backbone_config": {"out_features": [f"stage{i}" for i in range(1, 7)]}},
}
# models whose BatchNorms all sit in one part that takes another input than an image: that part,
# by (its class, its config's attribute), with token ids of TRANSFORMERS_INPUTS' shape as input
TRANSFORMERS_PARTS = {
    # 548M parameters (SAM3's ViT at 1008 px, DETR heads), no BatchNorm outside its MobileCLIP text
    # encoder (RepMixer blocks): the text encoder, on token ids
    "Sam3LiteText": ("Sam3LiteTextTextModel", "text_config"),
}
TRANSFORMERS_INPUTS = {
    "Sam3LiteText": (2, 16),  # token ids
    "EfficientLoFTR": (2, 2, 1, 64, 64),  # pairs of grayscale images to match
    "EdgeTam": (2, 3, 256, 256),  # the size its config's feature sizes are for
}


def uses_batchnorm(model) -> bool:
  import torch

  return any(
      isinstance(m, torch.nn.modules.batchnorm._BatchNorm) or type(m).__name__ == "FrozenBatchNorm2d"
      for m in model.modules()
  )


def timm_models() -> list[str]:
  """The smallest BatchNorm model (by parameters, built on the meta device) of each timm module."""
  import timm
  import torch

  chosen = []
  for module in timm.list_modules():
    best = None
    for name in timm.list_models(module=module):
      try:
        with torch.device("meta"):
          model = timm.create_model(name, pretrained=False, num_classes=10)
      except Exception:  # noqa: BLE001 - a model that cannot be built on meta is skipped
        continue
      if uses_batchnorm(model):
        size = sum(p.numel() for p in model.parameters())
        best = min(best or (size, name), (size, name))
    if best is not None:
      chosen.append(f"timm:{best[1]}")
  return chosen


def torchvision_models(families: bool = False) -> list[str]:
  """Every torchvision classification, segmentation and video model, and every detection model's
  backbone, that uses BatchNorm; ``families``: only the smallest of each builder module
  (``torchvision.models.resnet``, ``...regnet``, ``...detection.retinanet``), as for timm."""
  import torchvision

  names = [
      *torchvision.models.list_models(module=torchvision.models),
      *torchvision.models.list_models(module=torchvision.models.segmentation),
      *torchvision.models.list_models(module=torchvision.models.video),
      *(f"{name}.backbone" for name in torchvision.models.list_models(module=torchvision.models.detection)),
  ]
  chosen: dict[str, tuple[int, str]] = {}
  for name in names:
    model = on_meta(f"torchvision:{name}")
    if uses_batchnorm(model):
      family = torchvision.models.get_model_builder(name.removesuffix(".backbone")).__module__ if families else name
      size = sum(p.numel() for p in model.parameters())
      chosen[family] = min(chosen.get(family, (size, name)), (size, name))
  return [f"torchvision:{name}" for _, name in chosen.values()]


def transformers_models() -> list[str]:
  """Every Hugging Face transformers vision model class (its forward takes ``pixel_values``) whose
  modules hold BatchNorm at its config's defaults (built on the meta device)."""
  import inspect

  import torch
  import transformers

  def vision_model(prefix: str, config_name: str):
    model_class = getattr(transformers, f"{prefix}Model", None)
    forward = getattr(model_class, "forward", None)  # AutoModel has none
    if forward is None or list(inspect.signature(forward).parameters)[1:2] != ["pixel_values"]:
      return None
    with torch.device("meta"):
      return model_class(getattr(transformers, config_name)())

  chosen = []
  for name in dir(transformers):
    prefix = name.removesuffix("Config")
    if not name.endswith("Config") or prefix in ("Pretrained", "PreTrained"):
      continue
    try:
      model = vision_model(prefix, name)
    except Exception:  # noqa: BLE001 - a class needing another backend (torchaudio) or config is skipped
      continue
    if model is not None and uses_batchnorm(model):
      chosen.append(f"transformers:{prefix}")
  return chosen


def ultralytics_models() -> list[str]:
  """Every model yaml ultralytics ships (detect, segment, pose, obb, classify, depth, semantic,
  world, yoloe, rt-detr) at its ``n`` scale (or its smallest); files that differ only by scale
  (yolov9t..e, yolov10n..x, rtdetr-l/x, the resnet50/101 backbones) as one family, its smallest."""
  import re

  import ultralytics
  import yaml

  chosen: dict[tuple[str, str], tuple[int, str]] = {}
  for path in sorted((pathlib.Path(ultralytics.__file__).parent / "cfg" / "models").rglob("*.yaml")):
    scales = list(yaml.safe_load(path.read_text()).get("scales") or {})
    stem = path.stem
    if len(scales) > 1:  # one file for every scale: name the scale as ultralytics reads it (yolov8n-seg)
      scale = "n" if "n" in scales else scales[0]
      stem = re.sub(r"^(yolo(?:e-)?v?\d+)", rf"\g<1>{scale}", stem)
    family = re.sub(r"resnet\d+", "resnet", re.sub(r"^(yolov\d+)[a-z](?=-|$)|^(rtdetr)-[lx]$", r"\1\2", path.stem))
    try:
      size = sum(p.numel() for p in on_meta(f"ultralytics:{stem}").parameters())
    except Exception:  # noqa: BLE001 - kept: the sweep reports why it does not build
      size = 0
    key = (path.parent.name, family)
    chosen[key] = min(chosen.get(key, (size, stem)), (size, stem))
  return [f"ultralytics:{stem}" for _, stem in chosen.values()]


def smp_models() -> list[str]:
  """segmentation_models_pytorch: every decoder with a resnet18 encoder (DPT, which takes only
  timm's ViTs: vit_tiny), and the smallest encoder
  of each of smp's own encoder modules (resnet, dpn, vgg, senet, ...; not its ``tu-`` timm
  wrappers, swept as timm) under Unet."""
  import segmentation_models_pytorch as smp
  from segmentation_models_pytorch import encoders

  chosen = []
  for decoder in (name for name in smp.__all__ if name[0].isupper()):
    try:
      on_meta(f"smp:{decoder}/resnet18")
      chosen.append(f"smp:{decoder}/resnet18")
    except ValueError:  # DPT takes only timm's ViT-like encoders: its smallest
      chosen.append(f"smp:{decoder}/tu-vit_tiny_patch16_224")
  families: dict[str, tuple[int, str]] = {}
  for name in encoders.get_encoder_names():
    family = encoders.encoders[name]["encoder"].__module__
    model = on_meta(f"smp:Unet/{name}")
    if uses_batchnorm(model):
      size = sum(p.numel() for p in model.parameters())
      families[family] = min(families.get(family, (size, name)), (size, name))
  chosen += [f"smp:Unet/{name}" for _, name in families.values() if name != "resnet18"]
  return chosen


def on_meta(spec: str):
  """The model without its weights where it can be built so (fast), else built plainly."""
  import torch

  try:
    with torch.device("meta"):
      return build(spec)
  except (NotImplementedError, RuntimeError):  # builders that compute with tensors (regnet's widths)
    return build(spec)


def build(spec: str):
  import timm
  import torchvision

  source, _, name = spec.partition(":")
  if source == "ultralytics":  # random init from the shipped yaml; the torch module, not the wrapper
    import ultralytics

    if "rtdetr" in name:  # rtdetr-l, yolov8n-rtdetr: RT-DETR's decoder head
      return ultralytics.RTDETR(f"{name}.yaml").model
    get_model = torchvision.models.get_model
    # its TorchVision layer (yolo11-cls-resnet18) asks for pretrained weights: random init, as every row
    with unittest.mock.patch.object(torchvision.models, "get_model", lambda n, weights=None: get_model(n)):
      return ultralytics.YOLO(f"{name}.yaml", verbose=False).model
  if source == "smp":
    import segmentation_models_pytorch as smp

    decoder, _, encoder = name.partition("/")
    model = smp.create_model(decoder, encoder_name=encoder, encoder_weights=None, classes=3)
    if hasattr(model.encoder, "_drop_connect_rate"):  # its drop connect draws with torch.rand: off, as verify's dropout
      model.encoder._drop_connect_rate = 0.0
    return model
  if source == "timm":
    return timm.create_model(name, pretrained=False, num_classes=10)
  if source == "transformers":  # random init from the default config (TRANSFORMERS_CONFIGS where it cannot be)
    import transformers

    config_class = getattr(transformers, f"{name}Config")
    config = config_class(**transformers_config(config_class, name))
    if name in TRANSFORMERS_PARTS:
      part, attribute = TRANSFORMERS_PARTS[name]
      return getattr(transformers, part)(getattr(config, attribute))
    return getattr(transformers, f"{name}Model")(config)
  if name.endswith(".backbone"):  # a detection model's feature extractor (FPN included)
    model = torchvision.models.get_model(name.removesuffix(".backbone"), weights=None, weights_backbone=None)
    return model.backbone
  segmentation = torchvision.models.list_models(module=torchvision.models.segmentation)
  kwargs = {"aux_loss": False, "weights_backbone": None} if name in segmentation else {}
  return torchvision.models.get_model(name, num_classes=10, **kwargs)


def transformers_config(config_class, name: str) -> dict:
  """TRANSFORMERS_CONFIGS[name] as config arguments."""
  import transformers

  def backbone(value, owner):
    if value == "repvit_m1":
      return transformers.TimmWrapperConfig(
          architecture="repvit_m1", model_args={"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]}
      )
    if value == "sub_configs_defaults" or isinstance(value, dict):  # the owner's default, with changes
      spec = owner.sub_configs_defaults["backbone_config"]
      changes = value if isinstance(value, dict) else {}
      return transformers.AutoConfig.for_model(spec.model_type, **{**(spec.init_kwargs or {}), **changes})
    return value

  arguments = dict(TRANSFORMERS_CONFIGS.get(name, {}))
  if "backbone_config" in arguments:
    arguments["backbone_config"] = backbone(arguments["backbone_config"], config_class)
  if "vision_config" in arguments:
    vision_class = getattr(transformers, f"{name}VisionConfig")
    arguments["vision_config"] = vision_class(
        **{k: backbone(v, vision_class) for k, v in arguments["vision_config"].items()}
    )
  return arguments


def input_shape(spec: str, model) -> tuple[int, ...]:
  """64 px where the model takes it (fast), else the size its config names (windowed attention
  wants multiples of its window, some models a fixed size)."""
  import torch
  import torchvision

  def runs(shape) -> bool:
    try:
      with torch.no_grad():  # both modes: aux heads (torchvision's inception_v3) run in training only
        model.eval()(torch.zeros(shape))
        copy.deepcopy(model).train()(torch.zeros(shape))
      return True
    except Exception:  # noqa: BLE001 - the model needs another size
      return False

  name = spec.partition(":")[2]
  if spec.startswith("transformers:") and name in TRANSFORMERS_INPUTS:
    return TRANSFORMERS_INPUTS[name]
  if name in torchvision.models.list_models(module=torchvision.models.video):
    # s3d pools time 8x and ends in a 7x7 average pool at 1/32: 16 frames of 224 px
    shapes = [SIZE["video"][:2] + (frames,) + SIZE["video"][3:] for frames in (4, 8, 16)] + [(2, 3, 16, 224, 224)]
    shape = next((shape for shape in shapes if runs(shape)), None)
    if shape is None:
      raise ValueError(f"runs at none of the sweep's video sizes ({', '.join('x'.join(map(str, s)) for s in shapes)})")
    return shape
  config = getattr(model, "pretrained_cfg", None) or {}
  shape = SIZE["inception"] if "inception" in name else (2, 3, 64, 64)
  if config.get("fixed_input_size"):
    return (2, *config["input_size"])
  larger = [(2, 3, size, size) for size in (128, 224, 299)]  # torchvision's inception aux head needs 299
  return next((s for s in (shape, *larger) if runs(s)), (2, *config.get("input_size", (3, 224, 224))))


# A model that computes in float32 even when converted to float64 (efficientvit's LiteMLA calls
# .float(); xcit builds its position encoding in float32) has float32 rounding inside every
# float64 check: each side rounds there, and their float32 ops (sin, matmul) differ by ulps.
FLOAT32_INSIDE_GRAD64 = 1e-5
LAYOUTS = ("NCHW", "NHWC")  # the emitted source's: torch's, and channels-last
APIS = ("linen", "nnx")  # the emitted source's


def example_input(spec: str, model, shape):
  """Zeros of ``shape`` (verify draws its batches at random from it), or token ids (verify repeats
  integer inputs): random ids of the model's vocabulary."""
  import numpy as np

  if spec.partition(":")[2] in TRANSFORMERS_PARTS:
    return np.random.default_rng(0).integers(0, model.config.vocab_size, shape).astype(np.int64)
  return np.zeros(shape, np.float32)


def computes_in_float32(model, example) -> bool:
  """Whether ``model``, converted to float64, still makes a float32 (or lower) tensor."""
  import copy

  import torch
  from torch.overrides import TorchFunctionMode

  class Dtypes(TorchFunctionMode):
    low = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
      result = func(*args, **(kwargs or {}))
      for leaf in torch.utils._pytree.tree_leaves(result):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.dtype != torch.float64:
          Dtypes.low = True
      return result

  x = torch.from_numpy(example)
  model64, x = copy.deepcopy(model).double().eval(), x.double() if x.is_floating_point() else x
  with torch.no_grad(), Dtypes():
    model64(x)
  return Dtypes.low


def unshrunk_batchnorms(model) -> bool:
  """Redraws BatchNorm weights as N(1, 0.2) where a library's init drew them around 0 (mean
  magnitude under 0.1; transformers' RT-DETR family: N(0, initializer_range=0.01), not torch's 1),
  and says whether it did. There every BatchNorm shrinks the features ~100x: at the detection
  head they are ~1e-7, float32 rounds the anchors' scores to a few values, and the top-k order
  of those ties is whatever torch's CPU kernel leaves (unspecified); trained weights are not so."""
  import torch

  norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine]
  if not norms or sum(float(m.weight.abs().mean()) for m in norms) / len(norms) >= 0.1:
    return False
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for norm in norms:
      norm.weight.copy_(1 + 0.2 * torch.randn(norm.weight.shape, generator=generator))
  return True


def run_one(spec: str, emit_only: bool = False, layouts=LAYOUTS, apis=APIS, float32: bool = False) -> dict:
  """One model through ``jaxbn.verify`` (the port for 2 steps, then jaxbn.emit's source, Linen and
  NNX, for 1), in this process; the result as a JSON-able dict."""
  import torch

  import jaxbn

  start = time.perf_counter()
  try:
    torch.manual_seed(0)
    model = build(spec)
    redrawn = unshrunk_batchnorms(model)
    shape = input_shape(spec, model)
    example = example_input(spec, model, shape)
    jaxbn.verification.warm_up(model, example)  # non-trivial statistics
    rtol = FLOAT32_INSIDE_GRAD64 if computes_in_float32(model, example) else None
    if emit_only:
      check = float32_check if float32 else emit_check
      emitted = check(model, example, rtol, layouts, apis)
      status = "pass" if all(" pass" in cell for cell in emitted.split("; ")) else "emit"
      return {"status": status, "seconds": time.perf_counter() - start, "emit": emitted}
    result = jaxbn.verify(model, example, steps=2, rtol=rtol)
    figures = measured(result)
    notes = list(result.notes)
    if spec.partition(":")[2] in TRANSFORMERS_PARTS:
      notes.append(f"its BatchNorm part only: {type(model).__name__} on token ids")
    if redrawn:
      notes.append("BatchNorm weights redrawn N(1, 0.2): the library's init draws them near 0 (unshrunk_batchnorms)")
    if rtol == FLOAT32_INSIDE_GRAD64:
      notes.append(f"float64 checks at {rtol:g}: it computes in float32 inside")
    tracking = [c.name for c in result.checks if c.arbiter == "tracks torch float32"]
    if tracking:  # float32 that torch's own float32 does not resolve either (near-ties a top-k selects among)
      notes.append(f"{', '.join(tracking)} decided as close to torch float64 as torch float32 is")
    spread = [c for c in result.checks if "spread" in c.arbiter]
    if spread:
      worst = max(c.error / c.bound for c in spread)
      notes.append(
          f"{len(spread)} checks decided by torch's own spread one ulp away (worst {10 * worst:.1f}x, bound 10x)"
      )
    if not result.passed:
      failed = result.failed[0]
      reason = f"{failed.name} ({failed.dtype}): {failed.error:.2g} > {failed.bound:.2g}; " + (
          result.divergence.describe() if result.divergence else ""
      )
      return {"status": "mismatch", "seconds": time.perf_counter() - start, **figures, "reason": reason[:300]}
    return {
        "status": "pass",
        "seconds": time.perf_counter() - start,
        **figures,
        "emit": emit_check(model, example, rtol, layouts, apis) if apis else "-",
        "reason": "; ".join(notes),
    }
  except jaxbn.PortError as error:
    return {"status": "refused", "reason": refusal(error)}
  except Exception as error:  # noqa: BLE001 - reported in the table
    return failure(error)


def refusal(error) -> str:
  """A PortError's reason: its first line, and the first listed node where it lists them."""
  lines = [line.strip(" -") for line in str(error).splitlines() if line.strip()]
  return " ".join(lines[:2] if lines[0].endswith(":") else lines[:1])[:300]


def measured(result) -> dict:
  """The table's figures from a ``jaxbn.verify`` result."""

  def error(name, dtype):
    return max((c.error for c in result.checks if c.name == name and c.dtype == dtype), default=None)

  float32 = next(c.dtype for c in result.checks)
  return {
      "port_seconds": result.seconds["build"] / 2,  # the float32 and the float64 port
      "eval_rel": error("eval outputs", float32),
      "train_rel": error("training outputs", float32),
      "stats_rel": error("running statistics", float32),
      "grad64_rel": error("gradients", "float64"),
  }


def emit_check(model, example, rtol, layouts=LAYOUTS, apis=APIS) -> str:
  """jaxbn.emit's source, Linen then NNX (``apis``), in each layout, through ``jaxbn.verify(via="emit",
  steps=1)``; or why not."""
  import jaxbn

  def check(api, layout):
    result = jaxbn.verify(model, example, via="emit", api=api, layout=layout, steps=1, rtol=rtol)
    if result.passed:
      return f"pass {measured(result)['train_rel']:.1e}"
    return f"MISMATCH: {result.divergence.describe()[:80] if result.divergence else result.failed[0].name}"

  return each_source(check, layouts, apis)


def float32_check(model, example, rtol, layouts=LAYOUTS, apis=APIS) -> str:
  """``--float32``: jaxbn.emit's source against torch float32 from identical parameters (its eval
  output, a train-mode forward and its running statistics) within verify's float32 floor
  (statistics 1e-5) or, where float32 cannot resolve that, within 10x of jaxbn.port's own distance
  in the same check. For models whose float64 lock-step does not fit this machine: XLA's CPU
  convolutions compute a depthwise convolution's gradient as a dense (C, k, k, C) one, and
  nasnetalarge's float64 step holds 11 GB of such temporaries."""
  import tempfile

  import numpy as np

  import jaxbn
  from jaxbn._src.verify.api import FLOOR
  from jaxbn._src.verify.measures import SPREAD_FACTOR
  from jaxbn._src.verify.targets import _from_source
  from parity_tests.test_emit import NnxAsLinen, eval_and_training_forward

  del rtol  # float64's
  x = np.random.default_rng(0).standard_normal(example.shape).astype(np.float32)

  class AsTorchLayout:
    """Channels-last source behind torch's layout: verify's ``Layout`` moves its inputs by
    ``INPUT_AXES`` and its outputs back."""

    def __init__(self, module, layout):
      self.module, self.layout = module, layout

    def apply(self, variables, *inputs, train=False, mutable=()):
      result = self.module.apply(variables, *self.layout.model_inputs(inputs), train=train, mutable=mutable)
      if mutable:
        return self.layout.torch_output(result[0], train), result[1]
      return self.layout.torch_output(result, train)

  def emitted(api, layout, directory):
    """``jaxbn.port``'s signature through the source verify loads (``model.py``'s ``load()``)."""
    build = _from_source(api, pathlib.Path(directory), layout)

    def port(model, x):
      built = build(model, (x,), None)
      module, variables = built.module, built.variables
      if api == "nnx":
        module, variables = NnxAsLinen(built.module), jaxbn.nnx.to_variables(built.module)
      return (module if built.layout is None else AsTorchLayout(module, built.layout)), variables

    return port

  ported = eval_and_training_forward(copy.deepcopy(model), x, jaxbn.port)

  def check(api, layout):
    with tempfile.TemporaryDirectory() as directory:
      eval_rel, train_rel, stats_rel = eval_and_training_forward(
          copy.deepcopy(model), x, emitted(api, layout, directory)
      )
    worst = max(eval_rel, train_rel)
    ok = (worst <= FLOOR and stats_rel <= 1e-5) or (
        worst <= SPREAD_FACTOR * max(ported[:2]) and stats_rel <= max(1e-5, SPREAD_FACTOR * ported[2])
    )
    return (
        f"{'pass' if ok else 'MISMATCH'} {worst:.1e} (float32 only, port {max(ported[:2]):.1e}, statistics"
        f" {stats_rel:.1e}, port's {ported[2]:.1e})"
    )

  return each_source(check, layouts, apis)


def each_source(check, layouts=LAYOUTS, apis=APIS) -> str:
  """``check(api, layout)``'s cell for each emitted source (Linen then NNX, in each layout), named
  ``linen``, ``nnx NHWC``, ...; or why not (refused, failed)."""
  import jaxbn

  cells = []
  for layout in layouts:
    for api in apis:
      what = api if layout == "NCHW" else f"{api} {layout}"
      try:
        cells.append(f"{what} {check(api, layout)}")
      except jaxbn.PortError as error:
        cells.append(f"{what} refused: {str(error).splitlines()[0][:80]}")
      except Exception as error:  # noqa: BLE001 - reported in the table
        cells.append(f"{what} failed: {failure(error)['reason'][:80]}")
  return "; ".join(cells)


def failure(error: BaseException) -> dict:
  """A failed run, with where the error was raised."""
  frame = traceback.extract_tb(error.__traceback__)[-1]
  where = f"{pathlib.Path(frame.filename).name}:{frame.lineno}"
  message = str(error).splitlines()[0][:200] if str(error) else ""
  return {"status": "failed", "reason": f"{type(error).__name__} at {where}: {message}"}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", help="write the markdown table here")
  parser.add_argument("--only", nargs="*", help="models as timm:NAME / torchvision:NAME")
  parser.add_argument(
      "--zoo",
      choices=["timm", "torchvision", "transformers", "ultralytics", "smp", "all"],
      default="all",
      help="which zoo to sweep (all: timm and torchvision; the others are the `sweep` extra's libraries)",
  )
  parser.add_argument("--timeout", type=float, default=600, help="seconds per model")
  parser.add_argument(
      "--families", action="store_true", help="torchvision: the smallest model of each builder module only"
  )
  parser.add_argument(
      "--emit-only", action="store_true", help="only jaxbn.emit's source (jaxbn.verify(via='emit')), not the port"
  )
  parser.add_argument(
      "--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS), help="the emitted source's layouts to check"
  )
  parser.add_argument(
      "--apis",
      nargs="*",
      choices=APIS,
      default=list(APIS),
      help="the emitted source's APIs to check (none: the port only)",
  )
  parser.add_argument(
      "--float32",
      action="store_true",
      help="with --emit-only: the source's float32 check only, for models whose float64 lock-step does not fit memory",
  )
  parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one model, JSON out
  args = parser.parse_args()
  if args.float32 and not args.emit_only:
    parser.error("--float32 checks the emitted source: give --emit-only too")
  if args.one:
    print(json.dumps(run_one(args.one, args.emit_only, tuple(args.layouts), tuple(args.apis), args.float32)))
    return 0
  zoos = {
      "timm": timm_models,
      "torchvision": lambda: torchvision_models(args.families),
      "transformers": transformers_models,
      "ultralytics": ultralytics_models,
      "smp": smp_models,
  }
  wanted = [zoo for zoo in zoos if args.zoo == zoo or (args.zoo == "all" and zoo in ("timm", "torchvision"))]
  specs = args.only or [spec for zoo in wanted for spec in zoos[zoo]()]
  print(f"{len(specs)} models: {' '.join(specs)}", flush=True)
  rows = []
  for spec in specs:
    try:
      child = subprocess.run(
          [
              sys.executable,
              __file__,
              "--one",
              spec,
              "--layouts",
              *args.layouts,
              "--apis",
              *args.apis,
              *(["--emit-only"] if args.emit_only else []),
              *(["--float32"] if args.float32 else []),
          ],
          capture_output=True,
          text=True,
          timeout=args.timeout,
          cwd=ROOT,
      )
      lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
      last_error = child.stderr.strip().splitlines()[-1][:200] if child.stderr.strip() else "no output"
      if child.returncode in (-9, 137):  # SIGKILL: the kernel's out-of-memory killer, on this machine
        last_error = "killed (SIGKILL: out of memory)"
      result = json.loads(lines[-1]) if lines else {"status": "failed", "reason": last_error}
    except subprocess.TimeoutExpired:
      result = {"status": "timeout", "reason": f"over {args.timeout:.0f} s"}
    rows.append((spec, result))
    print(spec, json.dumps(result), flush=True)
    if args.out:  # rewritten after every model, so that a stopped sweep keeps what it measured
      pathlib.Path(args.out).write_text(report(rows, len(specs), args.layouts, args.apis, args.emit_only, args.float32))
  print(report(rows, len(specs), args.layouts, args.apis, args.emit_only, args.float32).split("\n\n")[1])
  return 0


def report(rows: list, planned: int, layouts=LAYOUTS, apis=APIS, emit_only: bool = False, float32: bool = False) -> str:
  import timm
  import torch
  import torchvision

  def cells(result):
    if emit_only and "emit" in result:
      return f"{result['status']} | - | - | - | - | - | {result['emit'].replace('|', '/')} | "
    if result["status"] != "pass":
      return f"{result['status']} | - | - | - | - | - | - | {result.get('reason', '').replace('|', '/')}"
    return (
        f"pass | {result['port_seconds']:.2f} | {result['eval_rel']:.1e} | {result['train_rel']:.1e} |"
        f" {result['stats_rel']:.1e} | {result['grad64_rel']:.1e} | {result.get('emit', '-').replace('|', '/')} |"
        f" {result.get('reason', '')}"
    )

  counts = {}
  for spec, result in rows:
    passed, total = counts.get(spec.partition(":")[0], (0, 0))
    counts[spec.partition(":")[0]] = (passed + (result["status"] == "pass"), total + 1)
  what = {
      "timm": "timm architecture modules",
      "torchvision": "torchvision models",
      "transformers": "transformers models",
      "ultralytics": "ultralytics models",
      "smp": "segmentation_models_pytorch models",
  }
  versions = [f"timm {timm.__version__}", f"torchvision {torchvision.__version__}", f"torch {torch.__version__}"]
  for library, module in (
      ("transformers", "transformers"),
      ("ultralytics", "ultralytics"),
      ("smp", "segmentation_models_pytorch"),
  ):
    if library in counts:
      versions.append(f"{module} {importlib.import_module(module).__version__}")
  summary = (
      ", ".join(f"{passed} of {total} {what[zoo]}" for zoo, (passed, total) in counts.items())
      + f" ({datetime.date.today()}; {', '.join(versions)}; {len(rows)} of {planned} planned models measured)"
  )
  table = "\n".join(
      [
          "| model | status | port (s) | eval | train, step 1 | running stats | float64 grads | emitted source | reason / note |",
          "|---|---|---|---|---|---|---|---|---|",
          *(f"| {spec} | {cells(result)} |" for spec, result in rows),
      ]
  )
  names = {"linen": "Linen", "nnx": "NNX", "NCHW": "torch's layout", "NHWC": "channels-last (NHWC)"}
  sources = f"{' and '.join(names[a] for a in apis)}, in {' and '.join(names[x] for x in layouts)}"
  emitted = f"jaxbn.verify(via='emit', steps=1), {sources}" if apis else "not checked in this run (--apis)"
  if emit_only and float32:
    return (
        f"Measured by benchmarks/zoo_sweep.py --emit-only --float32: jaxbn.emit's model.py ({sources}) loaded;"
        " its eval output, a train-mode forward and its running statistics against torch float32 from identical"
        " parameters (float32_check: no float64 lock-step). A model passes when every source does.\n\n"
        + summary
        + "\n\n"
        + table
        + "\n"
    )
  if emit_only:
    return (
        f"Measured by benchmarks/zoo_sweep.py --emit-only: jaxbn.emit's model.py ({sources}) loaded and checked"
        " by jaxbn.verify(via='emit', steps=1) (round trip,"
        " eval, a float32 step, a float64 step in lock-step with torch); the figure is the float32 training"
        " outputs' relative difference. A model passes when every source does.\n\n" + summary + "\n\n" + table + "\n"
    )
  return (
      "Measured by benchmarks/zoo_sweep.py (`make zoo`): each model (statistics warmed up by"
      " jaxbn.verification.warm_up) through jaxbn.verify, 2 SGD steps: relative differences against torch"
      " float32 from identical parameters (eval, the first step's training outputs and running statistics),"
      " float64 gradients against torch float64 (worst tensor; every step, with outputs, statistics and updated"
      f" parameters, in lock-step); emitted source: {emitted}.\n\n" + summary + "\n\n" + table + "\n"
  )


if __name__ == "__main__":
  sys.exit(main())
