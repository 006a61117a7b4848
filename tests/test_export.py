"""The exported artifact runs in a process without birefnet_jax and equals model.apply."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from birefnet_jax import export, load_converted
from birefnet_jax.convert import convert_file

import reference

jax.config.update('jax_default_matmul_precision', 'highest')

REFERENCE = reference.REFERENCE
FIXTURE = 'swin_w7_tiny_cls.safetensors'

# Runs in a fresh interpreter, from a folder where birefnet_jax is not importable.
CONSUMER = textwrap.dedent('''
    import sys
    import jax
    import numpy as np
    exported = jax.export.deserialize(bytearray(open(sys.argv[1], 'rb').read()))
    outputs = {}
    for name in sys.argv[2:]:
      outputs[name] = np.asarray(exported.call(np.load(name + '.npy')))
    np.savez('outputs.npz', **outputs)
    assert not any(m.startswith('birefnet_jax') for m in sys.modules), 'model code was imported'
    print(exported.in_avals, exported.out_avals)
''')


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  dst = tmp_path_factory.mktemp('export_model') / 'tiny'
  convert_file(str(REFERENCE / FIXTURE), str(dst))
  return str(dst)


def start_consumer(artifact, inputs, folder):
  """Starts the consumer process (it compiles while the test computes its reference)."""
  for name, x in inputs.items():
    np.save(folder / f'{name}.npy', x)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('PYTHONPATH', None)
  return subprocess.Popen([sys.executable, '-c', CONSUMER, str(artifact), *inputs], cwd=folder,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_consumer(process, folder):
  stdout, stderr = process.communicate(timeout=600)
  assert process.returncode == 0, stderr[-3000:]
  with np.load(folder / 'outputs.npz') as data:
    return {k: data[k] for k in data.files}, stdout


def test_exported_artifact_equals_model_apply_without_the_model_code(converted, tmp_path):
  artifact = tmp_path / 'tiny.jaxexport'
  assert export.main(['--checkpoint', converted, '--output', str(artifact),
                      '--resolution', '96x64', '--batch_size', 'dynamic']) == 0
  assert export.main(['--checkpoint', converted, '--output', str(artifact)]) == 1  # no overwrite
  x = np.random.default_rng(0).normal(size=(2, 64, 96, 3)).astype(np.float32)
  inputs = {'batch2': x}   # one call (one compilation) keeps the test fast
  process = start_consumer(artifact, inputs, tmp_path)
  model, variables = load_converted(converted)
  expected = np.asarray(jax.nn.sigmoid(jax.jit(model.apply)(variables, x)))
  outputs, stdout = finish_consumer(process, tmp_path)
  assert 'float32[b,64,96,3]' in stdout                   # a symbolic batch dimension
  assert outputs['batch2'].shape == (2, 64, 96, 1)
  np.testing.assert_allclose(outputs['batch2'], expected, rtol=0, atol=2e-5)


def test_fixed_batch_export_rejects_other_batch_sizes(converted):
  model, variables = load_converted(converted)
  exported = export.export_model(model, variables, height=64, width=64, batch_size=1)
  assert exported.in_avals[0].shape == (1, 64, 64, 3)
  restored = jax.export.deserialize(exported.serialize())
  with pytest.raises(Exception, match='shape'):
    restored.call(np.zeros((2, 64, 64, 3), np.float32))
