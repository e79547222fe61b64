import sys
from pathlib import Path

# The repository root, so tests import its modules (and `scripts.*`, `benchmarks.*`) from any working directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
