"""Kernel tooling that the runtime never imports: ahead-of-time compiles of the Triton kernels for
sm_80 / sm_90 without a GPU (``kernel_compile``, ``kernel_sweep``) and ptxas resource reports of the
CUDA C++ kernels (``cuda_resources``). ``cacheaug kernels`` drives them."""
