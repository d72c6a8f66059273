"""Test-wide settings: CPU-only DeepSpeed, Triton's interpreter where there is no GPU."""

import os

import torch

# Set before anything imports deepspeed or triton.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TRITON_INTERPRET", "1")
