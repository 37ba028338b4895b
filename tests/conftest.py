"""Put the repository root on sys.path so tests import `engine` as the CLI does."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import os  # noqa: E402

# tests/engine/test_quality_kohya_load.py runs in a kohya sd-scripts environment (KOHYA_PYTHON, bench/README.md);
# without one it is not collected rather than reported as skipped in every run
collect_ignore = [] if os.environ.get("KOHYA_PYTHON") else ["engine/test_quality_kohya_load.py"]
