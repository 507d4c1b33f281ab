"""``--plot``: the per-layer differences and drift of a parity report, drawn with matplotlib."""

from __future__ import annotations

import pathlib

from jaxbn.cli.errors import UsageError


def _pyplot():
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError as error:
    raise UsageError("--plot needs matplotlib: pip install 'jaxbn[plot]' (or matplotlib).") from error
  return plt


def check_plot_target(path: str) -> None:
  """Before any work: matplotlib is there, the folder exists and the suffix names a format it writes."""
  plt = _pyplot()
  target = pathlib.Path(path)
  if not target.parent.is_dir():
    raise UsageError(f"--plot {path}: no folder {target.parent}; create it or choose another path.")
  formats = plt.figure().canvas.get_supported_filetypes()
  plt.close("all")
  if target.suffix.lstrip(".").lower() not in formats:
    raise UsageError(
        f"--plot {path}: matplotlib writes {', '.join('.' + f for f in sorted(formats))}, not"
        f" {target.suffix or 'a file without a suffix'}."
    )


def plot_report(report, path: str, title: str, verification=None) -> None:
  """Per BatchNorm layer (in model order): worst train and eval output differences and running
  statistic drift, on a log scale; with a ``jaxbn.verify`` result, also each layer's worst float64
  gradient and update (parameters after the step) differences."""
  plt = _pyplot()
  layers = list(dict.fromkeys(row.layer for row in report))
  index = {name: i for i, name in enumerate(layers)}
  series = {
      "train output": [0.0] * len(layers),
      "eval output": [0.0] * len(layers),
      "running mean drift": [0.0] * len(layers),
      "running var drift": [0.0] * len(layers),
  }
  if verification is not None:
    figures = {f.layer: f for f in verification.layers}
    for name, field in (("gradient (float64)", "gradient"), ("update (float64)", "update")):
      series[name] = [getattr(figures.get(layer), field, None) or 0.0 for layer in layers]
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
