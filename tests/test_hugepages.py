"""pseudoseg_jax/hugepages.py: which GLIBC_TUNABLES a command re-executes with, and that it does."""

import os
import subprocess
import sys

import pytest

from pseudoseg_jax import hugepages

PRINT_TUNABLES = ("from pseudoseg_jax import hugepages; hugepages.reexec_with_hugepages(); "
                  "import os, sys; "
                  "print(os.environ.get('GLIBC_TUNABLES', '<unset>'), sys.argv[1:])")


def test_the_tunable_is_added_to_what_the_user_set():
  assert hugepages.tunables_with_hugepages({}) == "glibc.malloc.hugetlb=1"
  assert hugepages.tunables_with_hugepages({"GLIBC_TUNABLES": ""}) == "glibc.malloc.hugetlb=1"
  assert (hugepages.tunables_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
          == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")


def test_a_users_own_hugetlb_setting_or_the_opt_out_leaves_the_environment_alone():
  assert hugepages.tunables_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
  assert hugepages.tunables_with_hugepages(
      {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2"}) is None
  assert hugepages.tunables_with_hugepages({"PSEUDOSEG_HUGEPAGES": "0"}) is None
  # A name that merely contains ours is another tunable.
  assert (hugepages.tunables_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.hugetlbx=1"})
          == "glibc.malloc.hugetlbx=1:glibc.malloc.hugetlb=1")


def test_transparent_huge_pages_switched_off_means_no_reexec(tmp_path):
  setting = tmp_path / "enabled"
  setting.write_text("always madvise [never]\n")
  assert not hugepages.huge_pages_possible(str(setting))
  setting.write_text("always [madvise] never\n")
  assert hugepages.huge_pages_possible(str(setting))
  assert not hugepages.huge_pages_possible(str(tmp_path / "missing"))


def test_only_a_run_that_trains_on_the_cpu_reexecutes(tmp_path):
  nothing = (str(tmp_path / "nvidia[0-9]*"), str(tmp_path / "accel[0-9]*"))
  assert hugepages.trains_on_cpu({}, nothing)
  (tmp_path / "accel0").touch()  # A TPU v4 host's device node.
  assert not hugepages.trains_on_cpu({}, nothing)
  # JAX_PLATFORMS decides when set: its first platform is the one JAX picks.
  assert hugepages.trains_on_cpu({"JAX_PLATFORMS": "cpu"}, nothing)
  assert not hugepages.trains_on_cpu({"JAX_PLATFORMS": "cuda,cpu"}, ())
  assert not hugepages.trains_on_cpu({"JAX_PLATFORMS": " tpu "}, ())


def run_python(*args, **env):
  environ = {key: value for key, value in os.environ.items()
             if key not in ("GLIBC_TUNABLES", "PSEUDOSEG_HUGEPAGES")}
  return subprocess.run([sys.executable, *args], env={**environ, **env}, capture_output=True,
                        text=True, check=True).stdout.strip()


@pytest.mark.skipif(not (hugepages.glibc_supports_tunable() and hugepages.huge_pages_possible()),
                    reason="needs Linux, glibc >= 2.35 and transparent huge pages not 'never'")
def test_a_command_reexecutes_itself_once_with_its_arguments():
  # -c's code runs twice: the first run re-executes, the second finds the tunable set and goes on.
  assert run_python("-c", PRINT_TUNABLES, "--flag=1", "x y") == (
      "glibc.malloc.hugetlb=1 ['--flag=1', 'x y']")
  assert run_python("-c", PRINT_TUNABLES, GLIBC_TUNABLES="glibc.malloc.arena_max=2") == (
      "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1 []")
  assert run_python("-c", PRINT_TUNABLES, PSEUDOSEG_HUGEPAGES="0") == "<unset> []"
  # A run JAX will put on an accelerator is not re-executed.
  assert run_python("-c", PRINT_TUNABLES, JAX_PLATFORMS="tpu") == "<unset> []"
