"""Project-wide pytest setup, shared by tests/ and the release gates in suites/.

Tests never reach a model hub: every model they use is built and saved by the
test itself. Setting the hubs offline turns any accidental download into an error.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Under pytest-xdist (`make test` runs one worker per core) each worker gets its share of
# the cores: workers whose OpenMP pools all span every core spin against each other and
# run many times slower. Set before any test imports torch, and inherited by the CLI
# subprocesses a test starts; an OMP_NUM_THREADS the user set is kept.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _workers > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _workers))

# The test tiers size their threads above, so their CLI subprocesses skip the machine-wide core
# lease (s2l_guard/cores.py); tests/test_cores.py turns it on where it is the thing tested.
os.environ.setdefault("S2L_GUARD_CORE_LEASE", "0")
