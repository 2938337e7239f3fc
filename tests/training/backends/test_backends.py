"""The backend seam without Ray: the trainer and the local backend never import it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]


def test_importing_the_trainer_and_the_local_backend_does_not_import_ray() -> None:
    code = (
        "import sys; import training.trainer, training.backends, main; "
        "assert 'ray' not in sys.modules, 'ray imported'; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
