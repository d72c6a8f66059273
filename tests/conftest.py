"""Test-wide settings: CPU-only DeepSpeed, Triton's interpreter, a private data cache."""

import os

# Set before anything imports deepspeed or triton.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRITON_INTERPRET", "1")
