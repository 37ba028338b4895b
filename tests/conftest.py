"""Put the repository root on sys.path so tests import `engine` as the CLI does."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import os  # noqa: E402

# tests/engine/test_quality_kohya_*.py run in a kohya sd-scripts environment (KOHYA_PYTHON, KOHYA_DIR,
# bench/README.md); without one they are not collected rather than reported as skipped in every run
collect_ignore = [] if os.environ.get("KOHYA_PYTHON") else ["engine/test_quality_kohya_load.py"]
if not (os.environ.get("KOHYA_PYTHON") and os.environ.get("KOHYA_DIR")):
    collect_ignore.append("engine/test_quality_kohya_step.py")
