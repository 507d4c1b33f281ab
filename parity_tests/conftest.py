import os

# Eight simulated CPU devices for the multi-device tests. JAX reads this when its backend starts
# (the first computation), which is after this file is imported.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()


import pytest  # noqa: E402


@pytest.fixture
def jaxbn_cli(capsys):
  """The ``jaxbn`` command run in this process (no interpreter start-up per call): returns
  ``(exit status, stdout, stderr)``; argparse's exits count as statuses."""
  from jaxbn import cli

  def run(*args):
    try:
      code = cli.main([str(arg) for arg in args])
    except SystemExit as exit:
      code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err

  return run
