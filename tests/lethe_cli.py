"""The ``lethe`` command run as a user runs it: a fresh process, only LETHE_HOME set."""

import os
import subprocess
import sys
from pathlib import Path

from tests.integration.servers import PROJECT_ROOT


def lethe(home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LETHE_")}
    env |= {"LETHE_HOME": str(home), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "worker.cli", *args]
    return subprocess.run(
        command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
