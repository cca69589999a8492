"""Shared test settings."""

import os

# Each test's MLflow store gets its own tracking service (kvshare.tracking): let idle ones go soon.
os.environ.setdefault("KVSHARE_TRACKING_IDLE", "60")
