"""Shared test settings."""

import os

# Each test's MLflow store gets its own tracking service (kvshare.tracking): let idle ones go soon.
os.environ.setdefault("KVSHARE_TRACKING_IDLE", "60")
# Triton's kernels (kvshare.decode_attention, kvshare.gemv) run on the CPU by its interpreter: read when a kernel is
# defined, so set before any test module imports one.
os.environ.setdefault("TRITON_INTERPRET", "1")
