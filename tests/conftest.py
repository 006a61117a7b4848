"""Suite-wide setup: close a window in which pytest's own unraisable-exception hook breaks.

tensorflow_datasets imports its modules inside etils' `epy.lazy_imports()`, which replaces
`builtins.__import__` for the whole process while those imports run. If the garbage collector
runs a finalizer that raises inside that window (garbage left by any earlier test on the same
worker), pytest's unraisable-exception hook does `import tracemalloc`; under the patched import
tracemalloc's own `from functools import total_ordering` yields a lazy stub, and the hook fails
with "'LazyModule' object is not callable", which pytest reports as an error of whichever test
is being set up (CI saw it at the tfds tests' setup, depending on test order).

Importing both modules here, before any test has made garbage, closes the window:
tensorflow_datasets' lazy-import blocks then run at collection, and tracemalloc is already in
`sys.modules` when the hook needs it. Neither imports TensorFlow.
"""
import tracemalloc  # noqa: F401  pylint: disable=unused-import

import tensorflow_datasets  # noqa: F401  pylint: disable=unused-import
