"""Where things are: the repository root (the working directory of every process the tests start)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
