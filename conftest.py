"""Project-wide pytest setup, shared by tests/ and the release gates in suites/.

Tests never reach a model hub: every model they use is built and saved by the
test itself. Setting the hubs offline turns any accidental download into an error.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
