"""The GPU scatter-add workaround (jax-ml/jax#38806): which jax versions, how XLA_FLAGS is edited,
and that the option reaches XLA when set in time (checked in fresh processes: XLA reads its flags
once per process)."""

import os
import subprocess
import sys
import textwrap

import pytest

from birefnet_jax import xla_workarounds as xw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_affected_versions():
  assert not xw.affected_jax_version('0.10.1')
  assert xw.affected_jax_version('0.10.2')
  assert xw.affected_jax_version('0.11.0')
  assert xw.affected_jax_version('0.10.2.dev20260701')
  assert not xw.affected_jax_version('0.11.1')
  with pytest.raises(ValueError, match='not a version'):
    xw.affected_jax_version('main')


def test_option_is_merged_into_existing_flags():
  opt = xw.FTZ_ATOMICS_OPTION
  assert xw.with_backend_extra_option('', opt) == f'--xla_backend_extra_options={opt}'
  assert (xw.with_backend_extra_option('--xla_dump_to=/tmp/d', opt)
          == f'--xla_dump_to=/tmp/d --xla_backend_extra_options={opt}')
  assert (xw.with_backend_extra_option('--a=1 --xla_backend_extra_options=x,y --b=2', opt)
          == f'--a=1 --xla_backend_extra_options=x,y,{opt} --b=2')
  assert xw.with_backend_extra_option('--xla_backend_extra_options=', opt) == \
      f'--xla_backend_extra_options={opt}'
  already = f'--xla_backend_extra_options=x,{opt}'
  assert xw.with_backend_extra_option(already, opt) == already


def _run(code, **env):
  full_env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', xw.OPT_OUT_ENV)}
  full_env.update(env, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=full_env,
                       capture_output=True, text=True, timeout=120, check=True)
  return out.stdout.strip().splitlines()


def test_in_time_the_option_reaches_xla_and_too_late_warns():
  lines = _run('''
      import os, warnings
      from birefnet_jax import xla_workarounds as xw
      print(xw.enable_native_gpu_atomics(force=True))
      print(os.environ['XLA_FLAGS'])
      import jax, jax.numpy as jnp
      # XLA runs with the option (the CPU backend ignores an NVPTX option).
      print(jax.jit(lambda i: jnp.zeros(3).at[i].add(1.0))(jnp.array([1, 1, 2])).tolist())
      print(xw.enable_native_gpu_atomics(force=True))
      ''', XLA_FLAGS='--xla_cpu_enable_fast_math=false')
  assert lines == ['enabled',
                   '--xla_cpu_enable_fast_math=false '
                   f'--xla_backend_extra_options={xw.FTZ_ATOMICS_OPTION}',
                   '[0.0, 2.0, 1.0]', 'already set']

  lines = _run('''
      import warnings
      import jax
      jax.devices()                       # XLA reads XLA_FLAGS here
      from birefnet_jax import xla_workarounds as xw
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        print(xw.enable_native_gpu_atomics(force=True))
      print(any('did not take effect' in str(w.message) for w in caught))
      ''')
  assert lines[-2:] == ['too late', 'True']


def test_opt_out_and_not_needed():
  lines = _run('''
      import os
      from birefnet_jax import xla_workarounds as xw
      print(xw.enable_native_gpu_atomics(force=True))
      print(os.environ.get('XLA_FLAGS', ''))
      ''', **{xw.OPT_OUT_ENV: '0'})
  assert lines == ['disabled']
  # jax 0.10.1 never needs it, whatever is installed; importing the package leaves flags alone
  # on a machine without a CUDA plugin.
  assert xw.enable_native_gpu_atomics(jax_version='0.10.1') == 'not needed'
  if not xw.cuda_plugin_installed():
    lines = _run('''
        import os
        import birefnet_jax
        print(repr(os.environ.get('XLA_FLAGS', '')))
        ''')
    assert lines == ["''"]
