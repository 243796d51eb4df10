import os
import sys

# tests/ holds helper modules (tolerances.py, checkpoints.py) imported by the test files.
sys.path.insert(0, os.path.dirname(__file__))
