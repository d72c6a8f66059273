"""Test-wide settings: CPU-only DeepSpeed, Triton's interpreter where there is no GPU.

Imports torch only, so the kernel tests (``pytest -m gpu``) run where the training stack
(deepspeed, submitit, nibabel) is not installed.
"""

import os

import torch

# Set before anything imports deepspeed or triton.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: kernel tests that run on CUDA where there is a GPU (Triton kernels, the "
                   "CUDA data-consistency op); benchmarks/gpu_check.sh runs `pytest -m gpu`")
