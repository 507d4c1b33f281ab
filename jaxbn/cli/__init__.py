"""The ``jaxbn`` command: ``jaxbn check``, ``jaxbn convert``, ``jaxbn emit`` and ``jaxbn inspect``.

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

  jaxbn emit --model MODEL --out DIR [--api linen|nnx] [--weights PATH] [--size 224]
      the torch model (random init, or weights from PATH) as Flax source, DIR/model.py (one class
      per torch module class, layers at torch's names, no torch import), and its weights,
      DIR/model.safetensors; ``from DIR.model import load``. MODEL: as for check, through jaxbn.port.

  jaxbn inspect FILE
      every BatchNorm layer in a checkpoint (torch or Flax): channels, counter, recorded
      configuration, and running statistics that look wrong. Exit status 1 if any does.

A user error (a bad argument, a missing or unreadable file, a checkpoint that does not fit the
model, an existing output) prints one line naming the problem and the fix, and exits with status
2, found before any model runs wherever it can be known up front.
"""

from jaxbn.cli.errors import UsageError
from jaxbn.cli.main import main

__all__ = ["UsageError", "main"]
