"""What the benchmarks record about the machine they ran on (no torch, no JAX needed)."""
import platform


def cpu_name():
  """The CPU model from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()
