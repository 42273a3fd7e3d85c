"""The package imports without Qubes' or Xen's libraries."""

import subprocess
import sys


def test_package_imports_in_a_clean_interpreter():
    # -I: no user site, no PYTHONPATH -> qubesadmin is not importable
    out = subprocess.run(
        [sys.executable, "-I", "-c",
         "import qubes_gpu_share, sys; "
         "print(qubes_gpu_share.__version__, 'qubesadmin' in sys.modules)"],
        check=True, capture_output=True, text=True).stdout.split()
    assert out[1] == "False"
    assert out[0].count(".") == 2
