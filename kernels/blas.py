"""One BLAS thread for the kernels' small matmuls (threadpoolctl finds the library).

The kernels' batch matmuls are small (a few hundred streams x 64 x 128); OpenBLAS splits them
over every core, and with the broker, Redis and Faust's consumer thread on the same cores its
threads wait for each other: measured on a busy 2-core machine, 47 us per stream step at 170
streams with the default threads against 0.9 us with one. Environment variables
(``OPENBLAS_NUM_THREADS``) cannot do it once numpy is loaded, so the worker, ``replay`` and
``nab`` call :func:`limit_blas_threads` when they start.

>>> from threadpoolctl import threadpool_info
>>> limit_blas_threads(1) == any(lib["user_api"] == "blas" for lib in threadpool_info())
True
>>> all(lib["num_threads"] == 1 for lib in threadpool_info() if lib["user_api"] == "blas")
True
"""

from __future__ import annotations

_limiter: object | None = None  # kept alive: the limit lasts as long as this object


def limit_blas_threads(n: int = 1) -> bool:
    """Run the BLAS libraries numpy loaded on ``n`` threads; False if none was found."""
    global _limiter
    import numpy  # noqa: F401  (loads its BLAS, so threadpoolctl can see it)
    from threadpoolctl import ThreadpoolController

    controller = ThreadpoolController()
    blas = controller.select(user_api="blas")
    if not blas.lib_controllers:
        return False
    _limiter = blas.limit(limits=n)
    return True
