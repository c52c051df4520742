import os
import sys

sys.path.insert(0, os.path.dirname(__file__))   # the shared helpers (gradcheck)

# kernel decisions (ops/fused/choose.py) of the test run go to a fresh folder, not the user's
# cache: every run measures anew, and leaves nothing behind in ~/.cache
import tempfile  # noqa: E402
os.environ["RANDYGPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="randygpt-test-kernels-")
