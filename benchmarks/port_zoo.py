"""The port's proof table: every model of parity_tests/test_port_models.py through the parity
harness, with its measured worst differences and port time, as the README's markdown table.

  python benchmarks/port_zoo.py [--out port-zoo-cpu.md] [--only NAME ...]

Each run asserts the tests' tolerances (a failure is reported in the table's last column).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from parity_tests import port_harness  # noqa: E402
from parity_tests.test_port_models import CI, FULL  # noqa: E402


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", help="write the table here too")
  parser.add_argument("--only", nargs="*", help="model names (as in test_port_models.py)")
  args = parser.parse_args()
  cases = {**CI, **FULL}
  names = args.only or list(cases)
  rows = [
      "| model | input | port (s) | eval | train, step 1 | running stats | float64 grads | total (s) | result |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  failed = 0
  for name in names:
    case = cases[name]
    start = time.perf_counter()
    try:
      m = port_harness.run(case)
      result = "pass"
      cells = f"{m.port_seconds:.2f} | {m.eval_rel:.1e} | {m.train_rel:.1e} | {m.stats_rel:.1e} | {m.grad64_rel:.1e}"
    except Exception as error:  # noqa: BLE001 - reported in the table
      failed += 1
      traceback.print_exc()
      result, cells = f"FAILED: {str(error).splitlines()[0][:120]}", "- | - | - | - | -"
    shape = "x".join(map(str, case.input_shape))
    rows.append(f"| {name} | {shape} | {cells} | {time.perf_counter() - start:.0f} | {result} |")
    print(rows[-1], flush=True)
  table = "\n".join(rows)
  print(table)
  if args.out:
    pathlib.Path(args.out).write_text(
        "Measured by benchmarks/port_zoo.py: worst relative differences against torch float32 (eval and the first\n"
        "training step from identical parameters; running statistics relative to max(|value|, 1)) and float64\n"
        "gradients against torch float64.\n\n" + table + "\n"
    )
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
