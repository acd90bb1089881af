"""The code stays ruff clean: a lint failure fails make test, as CI runs nothing else."""

import subprocess
import sys

from scripts.processes import REPO


def test_ruff_check_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
