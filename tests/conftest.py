import os
import sys

sys.path.insert(0, os.path.dirname(__file__))   # the shared helpers (gradcheck)

# kernel decisions (ops/fused/choose.py) of the test run go to a fresh folder, not the user's
# cache: every run measures anew, and leaves nothing behind in ~/.cache
import tempfile  # noqa: E402
os.environ["RANDYGPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="randygpt-test-kernels-")

# loss.png is redrawn at every evaluation (~0.5 s with matplotlib); the many short runs of the
# suite evaluate every few steps, so drawing is off here except in tests/test_plot.py, which
# turns it back on and checks the pictures
os.environ["RANDYGPT_NO_PLOT"] = "1"
