import os

# Eight simulated CPU devices for the multi-device tests. JAX reads this when its backend starts
# (the first computation), which is after this file is imported.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
