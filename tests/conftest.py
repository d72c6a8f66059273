"""Test-wide settings: CPU-only DeepSpeed, Triton's interpreter where there is no GPU.

Imports torch only, so the kernel tests (``pytest -m gpu``) run where the training stack
(deepspeed, submitit, nibabel) is not installed.
"""

import os

import pytest
import torch

# Set before anything imports deepspeed or triton.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: kernel tests that run on CUDA where there is a GPU (Triton kernels, the "
                   "CUDA data-consistency op); benchmarks/gpu_check.sh runs `pytest -m gpu`")


def _forget_single_process_port() -> None:
    """An in-process run (kdhpc.distill.run, kdhpc.train.train) opens a one-rank process group
    and exports its rendezvous variables; the group stays open for the rest of the session. A
    later test that starts kdhpc in a subprocess would inherit MASTER_PORT and try to listen on
    the port that group holds (EADDRINUSE). The port is not read again once the group is up (the
    rest, LOCAL_RANK above all, DeepSpeed still reads), and a one-rank child picks a free port
    without it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() == 1:
        os.environ.pop("MASTER_PORT", None)


def pytest_runtest_setup(item):
    _forget_single_process_port()


def pytest_runtest_call(item):
    _forget_single_process_port()


@pytest.fixture(scope="module")
def single_intra_op_thread():
    """One intra-op thread for a module of tiny-tensor tests: on a busy shared machine a second
    thread only adds synchronisation, which costs more than the work itself."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
