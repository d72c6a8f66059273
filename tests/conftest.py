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


RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _forget_single_process_rendezvous() -> None:
    """An in-process run (kdhpc.distill.run, kdhpc.train.train) opens a one-rank process group
    and exports its rendezvous variables; the group stays open for the rest of the session. A
    later test that starts kdhpc in a subprocess would inherit them and try to listen on the
    port that group holds (EADDRINUSE). Once the group is up the variables are not read again,
    so each test starts without them."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() == 1:
        for name in RANK_VARIABLES:
            os.environ.pop(name, None)


def pytest_runtest_setup(item):
    _forget_single_process_rendezvous()


def pytest_runtest_call(item):
    _forget_single_process_rendezvous()
