"""The converter: full-size manifests map 1:1, bad checkpoints fail readably, the CLI round-trips."""

import json
from pathlib import Path
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import reference
from birefnet_jax import load_converted
from birefnet_jax.convert import CheckpointMismatchError, convert_state_dict, names
from birefnet_jax.convert.convert import abstract_variables, map_state_dict
from birefnet_jax.convert.infer import infer_model_config
from birefnet_jax.models.config import model_config

jax.config.update('jax_default_matmul_precision', 'highest')

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ('swin_v1_t', 'swin_v1_s', 'swin_v1_b', 'swin_v1_l',
             'pvt_v2_b0', 'pvt_v2_b1', 'pvt_v2_b2', 'pvt_v2_b5')



def manifest_stand_in(bb: str) -> tuple[dict, dict]:
  """A state dict of zero-stride arrays with the manifest's names and shapes (no memory)."""
  manifest = json.loads(reference.path(f'manifests/{bb}.json').read_text())
  sd = {e['key']: np.broadcast_to(np.zeros((), np.dtype(e['dtype'])), e['shape'])
        for e in manifest['keys']}
  return manifest, sd


@pytest.mark.parametrize('bb', MANIFESTS)
def test_full_size_preset_maps_every_manifest_key(bb):
  manifest, sd = manifest_stand_in(bb)
  cfg = model_config(bb)
  expected = names.flatten(abstract_variables(cfg))
  flat, ignored = map_state_dict(sd, expected, source=bb, materialize=False)
  assert len(flat) == len(expected)
  assert all(k.endswith(('num_batches_tracked', 'relative_position_index')) for k in ignored)
  n_params = sum(int(np.prod(v.shape)) for k, v in expected.items() if k[0] == 'params')
  assert n_params == manifest['num_parameters']
  n_bb = sum(int(np.prod(v.shape)) for k, v in expected.items() if k[:2] == ('params', 'bb'))
  assert n_bb == manifest['num_parameters_backbone']
  # The converter infers the same architecture from the names and shapes alone.
  inferred = infer_model_config(sd)
  assert inferred.backbone.to_dict() == cfg.backbone.to_dict()
  for field in ('aspp_planes', 'dec_inter_channels', 'ipt_inter_channels', 'cxt_num',
                'mul_scl_ipt', 'batch_norm', 'auxiliary_classification', 'squeeze_blocks'):
    assert inferred[field] == cfg[field], field


def test_missing_and_unexpected_keys_are_listed():
  sd = dict(load_file(reference.path('swin_w12_tiny.safetensors')))
  del sd['decoder.conv_out1.0.bias']
  sd['decoder.extra_head.weight'] = np.zeros((1, 2), np.float32)
  with pytest.raises(CheckpointMismatchError) as info:
    convert_state_dict(sd)
  message = str(info.value)
  assert 'missing' in message and 'params/decoder/conv_out1_0/bias' in message
  assert 'unexpected' in message and 'decoder.extra_head.weight' in message


def test_shape_mismatch_is_reported():
  sd = dict(load_file(reference.path('swin_w12_tiny.safetensors')))
  sd['decoder.conv_ms_spvn_3.weight'] = np.zeros((1, 5, 1, 1), np.float32)
  with pytest.raises(CheckpointMismatchError, match='conv_ms_spvn_3.weight'):
    convert_state_dict(sd)


def test_wrong_relative_position_index_is_rejected():
  sd = dict(load_file(reference.path('swin_w12_tiny.safetensors')))
  key = next(k for k in sd if k.endswith('relative_position_index'))
  sd[key] = sd[key][::-1].copy()
  with pytest.raises(CheckpointMismatchError, match='relative_position_index'):
    convert_state_dict(sd)


def test_cli_converts_and_load_converted_reproduces_the_official_logits(tmp_path):
  out = tmp_path / 'converted'
  src = reference.path('swin_w7_tiny_cls.safetensors')
  result = subprocess.run([sys.executable, 'tools/convert_torch_weights.py', str(src), str(out)],
                          cwd=ROOT, capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stderr
  model, variables = load_converted(str(out))
  io = reference.io('swin_w7_tiny_cls')
  logits = jax.jit(model.apply)(variables, reference.nhwc(io['input']))
  np.testing.assert_allclose(np.asarray(logits), reference.nhwc(io['eval_final_logits']), rtol=0,
                             atol=reference.tolerances('swin_w7_tiny_cls')['arrays']['eval_final_logits'])
  # Never overwrites without --overwrite.
  again = subprocess.run([sys.executable, 'tools/convert_torch_weights.py', str(src), str(out)],
                         cwd=ROOT, capture_output=True,
                         text=True, check=False)
  assert again.returncode != 0 and '--overwrite' in again.stderr


def test_backbone_only_checkpoint(tmp_path):
  """An ImageNet-style Swin checkpoint: backbone keys under 'model', plus classifier extras."""
  sd = load_file(reference.path('swin_w12_tiny.safetensors'))
  backbone = {k[3:]: v for k, v in sd.items() if k.startswith('bb.') and not k.startswith('bb.norm')}
  backbone['head.weight'] = np.zeros((10, 64), np.float32)
  backbone['head.bias'] = np.zeros((10,), np.float32)
  backbone['norm.weight'] = np.ones((64,), np.float32)
  backbone['norm.bias'] = np.zeros((64,), np.float32)
  src = tmp_path / 'swin_imagenet.safetensors'
  save_file(backbone, str(src))
  from birefnet_jax.convert import convert_file  # pylint: disable=g-import-not-at-top
  cfg, variables, backbone_only, report = convert_file(str(src), str(tmp_path / 'bb'))
  assert backbone_only
  assert cfg.backbone.embed_dim == 8 and cfg.backbone.window_size == 12
  assert {'head.weight', 'head.bias', 'norm.weight', 'norm.bias'} <= set(report['ignored'])
  assert report['missing'] == sorted(f'params/norm{s}/{leaf}' for s in range(4)
                                     for leaf in ('bias', 'scale'))
  np.testing.assert_array_equal(variables['params']['bb']['patch_embed']['proj']['kernel'],
                                sd['bb.patch_embed.proj.weight'].transpose(2, 3, 1, 0))
  with pytest.raises(ValueError, match='backbone weights'):
    load_converted(str(tmp_path / 'bb'))
