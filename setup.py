"""Build gptcore and its C++/CUDA extension ``gptcore._C``.

    pip install torch            # first: the extension compiles against it
    pip install --no-build-isolation -e .

Environment knobs:
    MAX_JOBS=N                   parallel compile jobs (ninja), as in torch.utils.cpp_extension
    TORCH_CUDA_ARCH_LIST="9.0"   CUDA architectures to build for (default: the visible GPU's, or 8.0;9.0)
    GPTCORE_NO_CUDA=1            build the CPU extension only, even where CUDA is available
    GPTCORE_NO_EXTENSION=1       skip the extension (the KV-cache ops then raise a clear error)

The CUDA sources (csrc/*.cu) are compiled only when torch was built with CUDA and nvcc is
found; otherwise the CPU implementation is built alone and the same op schemas still exist.
"""
import glob
import os
import sys

from setuptools import setup


def _extensions():
    if os.environ.get("GPTCORE_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit(
            "gptcore: building the extension needs torch installed first.\n"
            "  pip install torch && pip install --no-build-isolation -e .\n"
            "(or set GPTCORE_NO_EXTENSION=1 to install without the KV-cache extension)"
        )
    here = os.path.dirname(os.path.abspath(__file__))
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    use_cuda = (
        os.environ.get("GPTCORE_NO_CUDA") != "1"
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and bool(cu)
    )
    cxx = ["-O3"]
    define = []  # py_limited_api=True makes setuptools define Py_LIMITED_API
    if use_cuda:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        ext = cpp_extension.CUDAExtension(
            "gptcore._C",
            cpp + cu,
            include_dirs=[os.path.join(here, "csrc")],
            define_macros=define + [("GPTCORE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]},
            py_limited_api=True,
        )
    else:
        ext = cpp_extension.CppExtension(
            "gptcore._C",
            cpp,
            include_dirs=[os.path.join(here, "csrc")],
            define_macros=define,
            extra_compile_args={"cxx": cxx},
            py_limited_api=True,
        )
    print(f"gptcore: building gptcore._C ({'CPU + CUDA' if use_cuda else 'CPU only'})")
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
