"""Install kdhpc and build its C++ (and, with CUDA_HOME set, CUDA) data-consistency extension.

The extension must be compiled against the torch that will import it, so install torch first
and build without pip's isolated build environment (which would fetch a second torch):

    pip install torch==2.13.0 ninja pybind11 setuptools wheel
    pip install --no-build-isolation -e ".[test]"

pyproject.toml names only setuptools and wheel as build requirements (never torch, for the same
reason); without it, pip's legacy `setup.py develop` path would rebuild in an isolated
environment without torch and silently skip the extension.
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def extensions():
    """The DC extension ``kdhpc._C``: C++ always; CUDA only when CUDA_HOME is set.

    CUDA follows CUDA_HOME, not a visible GPU, so that a GPU-less build node can compile CUDA
    and a laptop with a GPU but no toolkit still builds. csrc/*.cpp holds the op and the CUDA
    glue (compiled only with KDHPC_WITH_CUDA); csrc/cuda/*.cu the raw kernels. The C++ standard
    is left to torch (2.13 needs C++20), and the module name comes from TORCH_EXTENSION_NAME.
    """
    try:
        from torch.utils import cpp_extension
    except ImportError:  # metadata-only invocations (egg_info) before torch is installed
        return [], {}
    sources = [str(p.relative_to(HERE)) for p in sorted((HERE / "csrc").glob("*.cpp"))]
    if not sources:
        return [], {}
    include_dirs = [str(HERE / "csrc")]
    cxx = ["-O3", "-g0"]  # no debug info: halves the compile time
    if os.environ.get("CUDA_HOME"):
        sources += [str(p.relative_to(HERE)) for p in sorted((HERE / "csrc" / "cuda").glob("*.cu"))]
        ext = cpp_extension.CUDAExtension(
            "kdhpc._C", sources, include_dirs=include_dirs,
            define_macros=[("KDHPC_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]})
    else:
        ext = cpp_extension.CppExtension("kdhpc._C", sources, include_dirs=include_dirs,
                                         extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="kdhpc",
    version="0.1.0",
    description="Knowledge distillation of MRI networks on a laptop CPU or a SLURM cluster",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kdhpc", "kdhpc.*"]),
    # The shipped default teachers and the manifest that pins them (kdhpc.teacher.pretrained).
    package_data={"kdhpc.teacher": ["weights/*.pt", "weights/manifest.json"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.24",
        "h5py>=3.8",
        "nibabel>=5.0",
        "nilearn>=0.10",
        "submitit>=1.5",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "matplotlib>=3.6",
        "scipy>=1.10",
    ],
    extras_require={
        # kdhpc.export: ONNX files (onnxscript drives torch's torch.export-based ONNX exporter,
        # which translates the DC-CNN's FFTs) and their CPU parity check and timing.
        "export": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2"],
        "tensorboard": ["tensorboard>=2.14"],
        "test": ["pytest>=7", "scikit-image>=0.21", "onnx>=1.16", "onnxruntime>=1.18",
                 "onnxscript>=0.2"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
