"""Install kdhpc and build its C++ (and, with CUDA_HOME set, CUDA) data-consistency extension.

The extension must be compiled against the torch that will import it, so install torch first
and build without pip's isolated build environment (which would fetch a second torch):

    pip install torch==2.13.0 ninja pybind11 setuptools wheel
    pip install --no-build-isolation -e ".[test]"

There is deliberately no pyproject.toml build-system table listing torch for the same reason.
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def extensions():
    """The DC extension: C++ always; CUDA only when CUDA_HOME is set (not when a GPU is seen)."""
    try:
        from torch.utils import cpp_extension
    except ImportError:  # metadata-only invocations (egg_info) before torch is installed
        return [], {}
    sources = [str(p.relative_to(HERE)) for p in sorted((HERE / "csrc").glob("*.cpp"))]
    if not sources:
        return [], {}
    define = [("KDHPC_EXT_NAME", "_C")]
    cxx = ["-O3", "-std=c++17"]
    if os.environ.get("CUDA_HOME"):
        sources += [str(p.relative_to(HERE)) for p in sorted((HERE / "csrc" / "cuda").glob("*.cu"))]
        ext = cpp_extension.CUDAExtension(
            "kdhpc._C", sources, define_macros=define + [("KDHPC_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]})
    else:
        ext = cpp_extension.CppExtension("kdhpc._C", sources, define_macros=define,
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
    extras_require={"test": ["pytest>=7", "scikit-image>=0.21"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
