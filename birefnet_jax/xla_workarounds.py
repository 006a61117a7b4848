"""Workarounds for known XLA problems, applied when ``birefnet_jax`` is imported.

GPU scatter-add (jax-ml/jax#38806). The gradient of a gather is a scatter-add, and BiRefNet's
backward pass is full of them: the bilinear sampling of every modulated deformable convolution
(ASPPDeformable) and the align-corners resizes. From jaxlib 0.10.2 through 0.11.0, the LLVM inside
XLA lowers float32 atomic adds on NVIDIA GPUs to a compare-and-swap retry loop instead of the
native ``atom.add.f32`` (it now respects IEEE denormals, which the native global atomic flushes),
which is up to orders of magnitude slower where many updates hit the same address, as the
2x2 neighbourhoods of neighbouring samples do. LLVM's option ``-nvptx-allow-ftz-atomics``
restores the native instruction (and the numerics of jaxlib <= 0.10.1: a denormal partial sum
may be flushed to zero). XLA reads it from ``XLA_FLAGS`` (``--xla_backend_extra_options``), once,
when the first backend starts; so it must be set before any JAX computation.

``enable_native_gpu_atomics()`` adds the option on the affected jax versions when a CUDA plugin
is installed, and warns if XLA has already read its flags. ``BIREFNET_XLA_WORKAROUNDS=0`` turns
it off (e.g. to measure the difference: ``BIREFNET_XLA_WORKAROUNDS=0 python tools/bench_model.py``;
the tool's JSON records the XLA_FLAGS it ran with).
"""

import importlib.util
import logging
import os
import re
import warnings

FTZ_ATOMICS_OPTION = '-nvptx-allow-ftz-atomics'
EXTRA_OPTIONS_FLAG = '--xla_backend_extra_options='
# The jax releases whose LLVM has the CAS-loop lowering (and knows the option). Releases after
# 0.11.0 are expected to carry LLVM's fix (the option defaulting to on); an unknown option would
# make LLVM refuse to start, so the range is not open-ended.
AFFECTED_JAX = ((0, 10, 2), (0, 11, 0))
OPT_OUT_ENV = 'BIREFNET_XLA_WORKAROUNDS'


def version_tuple(version: str) -> tuple[int, int, int]:
  match = re.match(r'(\d+)\.(\d+)\.(\d+)', version)
  if not match:
    raise ValueError(f'not a version: {version!r}')
  return tuple(int(g) for g in match.groups())


def affected_jax_version(version: str) -> bool:
  return AFFECTED_JAX[0] <= version_tuple(version) <= AFFECTED_JAX[1]


def with_backend_extra_option(xla_flags: str, option: str) -> str:
  """``xla_flags`` with ``option`` appended to its ``--xla_backend_extra_options`` list (added
  if absent); other flags are kept as they are."""
  tokens = xla_flags.split()
  for i, token in enumerate(tokens):
    if token.startswith(EXTRA_OPTIONS_FLAG):
      value = token[len(EXTRA_OPTIONS_FLAG):]
      if option in value.split(','):
        return xla_flags
      tokens[i] = EXTRA_OPTIONS_FLAG + (f'{value},{option}' if value else option)
      return ' '.join(tokens)
  return ' '.join(tokens + [EXTRA_OPTIONS_FLAG + option])


def cuda_plugin_installed() -> bool:
  names = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_plugins.xla_cuda12',
           'jax_plugins.xla_cuda13')
  for name in names:
    try:
      if importlib.util.find_spec(name) is not None:
        return True
    except (ImportError, ValueError):
      continue
  return False


def xla_has_read_option(option: str) -> bool:
  """Whether the backend options XLA parsed from ``XLA_FLAGS`` contain ``option``.

  XLA parses ``XLA_FLAGS`` once per process; building ``CompileOptions`` triggers that parse if
  it has not happened yet, so right after setting the variable this both locks it in and says
  whether it took effect.
  """
  from jaxlib import xla_client  # pylint: disable=import-outside-toplevel
  return option.encode() in xla_client.CompileOptions().SerializeAsString()


def enable_native_gpu_atomics(jax_version: str | None = None, force: bool = False) -> str:
  """Adds ``-nvptx-allow-ftz-atomics`` to ``XLA_FLAGS`` where jax-ml/jax#38806 applies.

  Returns what happened: 'disabled', 'not needed', 'already set', 'enabled' or 'too late'
  (XLA had read its flags before; a warning says how to set the variable by hand). ``force``
  skips the version and plugin checks (tests).
  """
  if os.environ.get(OPT_OUT_ENV, '') in ('0', 'false', 'False', 'off'):
    return 'disabled'
  if not force:
    if jax_version is None:
      from jax import version as jax_version_module  # pylint: disable=import-outside-toplevel
      jax_version = jax_version_module.__version__
    if not affected_jax_version(jax_version) or not cuda_plugin_installed():
      return 'not needed'
  flags = os.environ.get('XLA_FLAGS', '')
  if FTZ_ATOMICS_OPTION in flags or '--xla_gpu_ftz=true' in flags.lower():
    return 'already set'
  os.environ['XLA_FLAGS'] = with_backend_extra_option(flags, FTZ_ATOMICS_OPTION)
  if xla_has_read_option(FTZ_ATOMICS_OPTION):
    logging.getLogger(__name__).info('XLA_FLAGS: added %s (GPU scatter-add, jax-ml/jax#38806)',
                                     FTZ_ATOMICS_OPTION)
    return 'enabled'
  warnings.warn(
      'birefnet_jax: XLA had read XLA_FLAGS before birefnet_jax was imported, so the workaround '
      'for slow GPU scatter-adds (jax-ml/jax#38806; the backward pass of the deformable '
      "convolutions) did not take effect. Import birefnet_jax before running any JAX computation, "
      f"or start Python with XLA_FLAGS='{EXTRA_OPTIONS_FLAG}{FTZ_ATOMICS_OPTION}'.",
      RuntimeWarning, stacklevel=2)
  return 'too late'
