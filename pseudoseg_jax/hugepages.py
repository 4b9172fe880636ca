"""Transparent huge pages for malloc, so that XLA:CPU's per-step buffers stop costing page faults.

XLA:CPU allocates an executable's temporary buffer with malloc every time it runs it (2.7 GB for
the ResNet-50 PseudoSeg step at crop 321). glibc serves any allocation over 32 MB with a fresh
mmap and unmaps it on free, so every step faulted all of that memory in again, 4 KiB at a time,
each page zeroed by the kernel. On the 2-core benchmark machine (AMD EPYC, Linux 6.18, THP in
"madvise" mode) `perf` put 21% of a step's CPU time in the kernel, and one benchmark run took 6.3
million page faults. glibc's tunable `glibc.malloc.hugetlb=1` makes malloc ask for transparent
huge pages on the memory it maps: 0.65 million faults, and the step's median went from 6.4-7.8 s
(seven runs) to 5.8-6.3 s (five runs; BENCHMARKS.md). Results do not change: only where memory
comes from.

glibc reads tunables once, when a process starts, so the command-line entry points re-execute
themselves once with the tunable added (same PID, arguments and environment otherwise). Nothing
happens where it would not help or is not wanted: off Linux or glibc, glibc older than 2.35
(no such tunable), transparent huge pages disabled ("never"), a GLIBC_TUNABLES that already
names `glibc.malloc.hugetlb` (the user's choice), PSEUDOSEG_HUGEPAGES=0, or a run that will not
train on the CPU: a GPU or TPU device node is present (or JAX_PLATFORMS puts another platform
first), and there the change to malloc would reach only TensorFlow's input pipeline and the host
side, unmeasured. A notebook cannot re-execute its kernel: start it with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 in its environment.
"""

from __future__ import annotations

import glob
import os
import platform
import sys
from typing import Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT_VARIABLE = "PSEUDOSEG_HUGEPAGES"
THP_SETTING_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
FIRST_GLIBC_WITH_TUNABLE = (2, 35)
# Device nodes of the accelerators JAX trains on: NVIDIA GPUs, AMD GPUs (ROCm), TPU v2-v4 and
# TPU v5 and later (VFIO). Checked without importing JAX, which would claim the devices.
ACCELERATOR_DEVICE_GLOBS = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def trains_on_cpu(environ: Mapping[str, str],
                  device_globs: tuple[str, ...] = ACCELERATOR_DEVICE_GLOBS) -> bool:
  """Whether JAX will pick its CPU backend: JAX_PLATFORMS's first entry when it is set (JAX
  prefers the platforms in the order given), else no accelerator device node on the host."""
  platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return platforms[0] == "cpu"
  return not any(glob.glob(pattern) for pattern in device_globs)


def tunables_with_hugepages(environ: Mapping[str, str]) -> Optional[str]:
  """The GLIBC_TUNABLES value to run with, or None to leave the environment as it is.

  Tunables are colon-separated NAME=VALUE pairs; ours is appended to any the user set.
  """
  if environ.get(OPT_OUT_VARIABLE, "1") == "0":
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  names = [item.split("=", 1)[0] for item in current.split(":") if item]
  if TUNABLE in names:
    return None
  return ":".join(filter(None, [current, f"{TUNABLE}=1"]))


def glibc_supports_tunable() -> bool:
  """True on Linux with glibc >= 2.35, where `glibc.malloc.hugetlb` exists."""
  if sys.platform != "linux":
    return False
  library, version = platform.libc_ver()
  if library != "glibc":
    return False
  try:
    major_minor = tuple(int(part) for part in version.split(".")[:2])
  except ValueError:
    return False
  return major_minor >= FIRST_GLIBC_WITH_TUNABLE


def huge_pages_possible(setting_file: str = THP_SETTING_FILE) -> bool:
  """False when the kernel has transparent huge pages switched off ('[never]' selected)."""
  try:
    with open(setting_file) as setting:
      return "[never]" not in setting.read()
  except OSError:
    return False


def reexec_with_hugepages() -> None:
  """Re-executes this process's command with the tunable set, where that helps (module
  docstring); returns without doing anything otherwise. Call it first thing in a command-line
  entry point: whatever ran before is run again."""
  value = tunables_with_hugepages(os.environ)
  if (value is None or not trains_on_cpu(os.environ) or not glibc_supports_tunable()
      or not huge_pages_possible()):
    return
  environ = dict(os.environ, GLIBC_TUNABLES=value)
  # sys.orig_argv is the interpreter's own command line (options, -m or -c included).
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
