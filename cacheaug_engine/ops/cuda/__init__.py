"""CUDA C++ glue: the compiled extension (``cacheaug_engine._C``) behind torch ops (``launch``), the C
API's argument layout (``abi``), and framework-free interop over CuPy / DLPack arrays (``interop``)."""
