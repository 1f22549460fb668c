"""Build script for lmcor.

The top-level folders install as sub-packages of one namespaced package:
runtime/ -> lmcor.runtime, export/ -> lmcor.export, kernels/ -> lmcor.kernels,
bench/ -> lmcor.bench, recipes/ -> lmcor.recipes, and lmcor/ holds the public API, the CLI
(lmcor/cli) and the HTTP server (lmcor/server).
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

try:  # a build requirement (pyproject.toml); without it, lmcor installs with the Python references only
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:
    Pybind11Extension = build_ext = None


def _core_extension():
    """`lmcor._core`: each decode step's host work in C++ (kernels/core). Optional: where it cannot be
    built (no compiler), the install goes on and lmcor runs the Python references, saying so once."""
    if Pybind11Extension is None:
        return []
    # -ffp-contract=off: no fused multiply-adds, so that chrF's doubles equal the Python reference's;
    # -fopenmp-simd: the argmax's max reduction in SIMD lanes (no OpenMP runtime).
    flags = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fopenmp-simd"]
    # The sources' digest goes into the module, so that a checkout updated without a rebuild is noticed.
    sources = Path(__file__).parent / "kernels" / "core"
    spec = importlib.util.spec_from_file_location("lmcor_core_digest", sources / "digest.py")
    digest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digest)
    headers = sorted(f"kernels/core/{path.name}" for path in sources.glob("*.hpp"))
    return [Pybind11Extension("lmcor._core", ["kernels/core/core.cpp"], depends=headers,
        cxx_std=17, extra_compile_args=flags, define_macros=[("LMCOR_CORE_SOURCES", f'"{digest.sources_digest(sources)}"')], optional=True)]

PACKAGES = {
    "lmcor": "lmcor",
    "lmcor.cli": "lmcor/cli",
    "lmcor.server": "lmcor/server",
    "lmcor.integrations": "lmcor/integrations",
    "lmcor.runtime": "runtime",
    "lmcor.export": "export",
    "lmcor.kernels": "kernels",
    "lmcor.bench": "bench",
    "lmcor.recipes": "recipes",
}

# Every ONNX Runtime build installs the same `onnxruntime` module folder, so exactly one may be
# required: the one already installed, else the GPU build on CUDA machines, else the CPU build.
ORT_DISTRIBUTIONS = ("onnxruntime-gpu", "onnxruntime", "onnxruntime-directml", "onnxruntime-openvino")
ORT_FLOOR = "1.18"


def _installed_onnxruntime():
    # pip builds in an isolated environment; ask the interpreter without the isolation paths.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    probe = (
        "import importlib.metadata as m\n"
        f"for d in {ORT_DISTRIBUTIONS!r}:\n"
        "    try:\n        m.version(d); print(d); break\n"
        "    except m.PackageNotFoundError:\n        pass\n"
    )
    try:
        out = subprocess.run([sys.executable, "-I", "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _onnxruntime_requirement():
    forced = os.environ.get("LMCOR_ONNXRUNTIME")
    if forced:
        # a name alone gets the floor; a version or a direct reference (`name @ URL`) is taken as given
        return forced if any(c in forced for c in "<>=!~@") else f"{forced}>={ORT_FLOOR}"
    installed = _installed_onnxruntime()
    if installed:
        return f"{installed}>={ORT_FLOOR}"
    has_cuda = shutil.which("nvidia-smi") is not None or os.path.exists("/proc/driver/nvidia/version")
    return f"onnxruntime-gpu>={ORT_FLOOR}" if has_cuda else f"onnxruntime>={ORT_FLOOR}"


EXPORT = [
    "torch>=2.1,<3",
    "transformers>=4.45,<4.58",
    "optimum-onnx>=0.1.0,<0.2",
    "accelerate>=0.26",
    "onnx>=1.15",
]

BENCH = ["matplotlib>=3.7", "psutil>=5.9"]
# `lmcor serve`; uvicorn's shutdown is extended (`server.runner`), so its minor version is capped.
# httptools and uvloop: the HTTP parser and event loop uvicorn picks where they are installed (the
# load numbers in docs/serving.md were measured with them).
SERVE = ["fastapi>=0.110", "uvicorn>=0.29,<0.60", "prometheus_client>=0.20", "httptools>=0.5",
         "uvloop>=0.17; sys_platform != 'win32'"]
# The Triton kernels (GPU; on CPU through Triton's interpreter, for their tests).
KERNELS = ["torch>=2.1,<3", "triton>=3.2; platform_system == 'Linux'"]
# Ray Serve replicas and Ray Data jobs (`lmcor.integrations.ray`).
RAY = ["ray[serve,data]>=2.60"]

setup(
    name="lmcor",
    version="0.1.0",
    description="Compiled inference runtime for small models that improve big ones (LMCor correctors, students)",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    license="Apache-2.0",
    license_files=["LICENSE"],
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"lmcor": ["models/*/*", "py.typed"]},  # the shipped bundles: default corrector (fp32, int8), gate
    install_requires=["numpy>=1.24", "tokenizers>=0.15", "tqdm>=4.60", _onnxruntime_requirement()],
    extras_require={
        "export": EXPORT,
        "eval": ["sacrebleu>=2.3"],
        "bench": EXPORT + BENCH + SERVE + ["ctranslate2>=4.0", "httpx>=0.27"],
        "kernels": KERNELS,
        "serve": SERVE,
        "ray": RAY,
        "test": EXPORT + BENCH + KERNELS + SERVE + RAY + ["pytest>=7", "sacrebleu>=2.3", "httpx>=0.27", "schemathesis>=4.0"],
    },
    entry_points={"console_scripts": ["lmcor=lmcor.cli:main"]},
    ext_modules=_core_extension(),
    cmdclass={} if build_ext is None else {"build_ext": build_ext},
)
