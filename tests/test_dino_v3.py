"""DINOv3 backbone against timm's official model (fixtures in tests/data, see tests/data/README.md).

The fixture is timm 1.0.31's ``vit_small_plus_patch16_dinov3`` (SwiGLU) built as the official
``models/backbones/dino_v3.py`` builds them (features_only, dynamic_img_size, out_indices), at
tiny widths with random weights; their state dicts go through the converter.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from birefnet_jax.convert import convert
from birefnet_jax.models import config as config_lib
from birefnet_jax.models.birefnet import build_backbone
from birefnet_jax.models.dino_v3 import DinoV3, rope_tables

jax.config.update('jax_default_matmul_precision', 'highest')

DATA = Path(__file__).parent / 'data'
VARIANTS = ('dinov3_tiny_swiglu',)   # the GELU variant: tests/test_dino_v3_birefnet.py


def manifest(variant):
  return json.loads((DATA / 'dinov3_backbones.json').read_text())[variant]


def converted(variant):
  spec = manifest(variant)['create_model_kwargs']
  return convert.convert_backbone_state_dict(
      load_file(DATA / f'{variant}.safetensors'), source=variant,
      dino_heads=spec['num_heads'], dino_out_indices=spec['out_indices'])


_CONVERTED = {}


@pytest.fixture(params=VARIANTS)
def variant_and_model(request):
  """(variant, converted config, variables, jitted backbone apply), converted once per variant."""
  variant = request.param
  if variant not in _CONVERTED:
    bb_cfg, variables, report = converted(variant)
    backbone = build_backbone(bb_cfg, None, name=None)
    _CONVERTED[variant] = (bb_cfg, variables, report, jax.jit(backbone.apply))
  return (variant,) + _CONVERTED[variant]


def nhwc(array):
  return np.transpose(array, (0, 2, 3, 1))


def test_converter_maps_every_tensor(variant_and_model):
  variant, bb_cfg, variables, report, _ = variant_and_model
  spec = manifest(variant)
  kwargs = spec['create_model_kwargs']
  assert bb_cfg.family == 'dino_v3'
  assert bb_cfg.embed_dim == kwargs['embed_dim']
  assert bb_cfg.depth == spec['blocks_kept']
  assert bb_cfg.swiglu
  assert bb_cfg.mlp_hidden == 88   # int(32 * 2.6) = 83, aligned to 8
  assert report == {'ignored': [], 'missing': []}
  n_params = len(jax.tree.leaves(variables))
  assert n_params == len(spec['state_dict'])


def test_features_match_timm_float32(variant_and_model):
  variant, _, variables, _, apply = variant_and_model
  io = np.load(DATA / f'{variant}.npz')
  tol = manifest(variant)['tolerances_f32']
  features = apply({'params': variables['params']['bb']}, jnp.asarray(nhwc(io['input'])))
  assert len(features) == 4
  for i, f in enumerate(features):
    key = f'x{i + 1}'
    np.testing.assert_allclose(np.asarray(f), nhwc(io[key]), rtol=0, atol=tol[key], err_msg=key)


def test_features_match_timm_float64(variant_and_model):
  variant, bb_cfg, variables, _, _ = variant_and_model
  io = np.load(DATA / f'{variant}.npz')
  tol = manifest(variant)['tolerances_f64']
  backbone = build_backbone(bb_cfg, None, name=None)
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables['params']['bb'])
    features = jax.jit(backbone.apply)({'params': params},
                                       jnp.asarray(nhwc(io['input']).astype(np.float64)))
    for i, f in enumerate(features):
      key = f'x{i + 1}'
      assert f.dtype == jnp.float64
      np.testing.assert_allclose(np.asarray(f), nhwc(io[key + '_f64']), rtol=0, atol=tol[key],
                                 err_msg=key)


def test_rope_tables_distinguish_rows_from_columns():
  """The fixture inputs are not square (6 x 4 and 4 x 6 patches), so the parity tests check the
  row/column order of the RoPE angles; here: the tables of a grid and of its transpose differ."""
  sin, cos = rope_tables(4, 6, 16, 100.0, jnp.float32)
  sin_t, cos_t = rope_tables(6, 4, 16, 100.0, jnp.float32)
  transpose = lambda t: t.reshape(6, 4, -1).swapaxes(0, 1).reshape(24, -1)
  assert sin.shape == (24, 16)
  assert float(jnp.max(jnp.abs(sin - transpose(sin_t)))) > 0.1
  # the first half (row angles) of a grid equals the second half (column angles) of its transpose
  np.testing.assert_allclose(sin[:, :4], transpose(sin_t)[:, 4:8], atol=1e-6)


def test_presets_are_the_official_ones():
  """Widths of official models/backbones/dino_v3.py + config.py (lateral channels = D x 4)."""
  official_channels = {'dino_v3_7b': 4096, 'dino_v3_h_plus': 1280, 'dino_v3_l': 1024,
                       'dino_v3_b': 768, 'dino_v3_s_plus': 384, 'dino_v3_s': 384}
  for name, width in official_channels.items():
    bb = config_lib.backbone_config(name)
    assert config_lib.backbone_channels(bb) == (width,) * 4
    assert max(bb.out_indices) + 1 == bb.depth


def test_size_not_multiple_of_patch_is_an_error():
  model = DinoV3(embed_dim=8, num_heads=2, mlp_hidden=16, out_indices=(0, 1, 2, 3))
  with pytest.raises(ValueError, match='multiples of 16'):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 40, 32, 3)))


def test_model_config_json_round_trip():
  """What the converter writes (model_config.json) reads back as the same DINOv3 config."""
  cfg = config_lib.model_config('dino_v3_s_plus', freeze_backbone=False)
  back = convert.config_from_json(convert.config_to_json(cfg))
  assert back.to_dict() == cfg.to_dict()


def test_bfloat16_features_are_float32_and_close():
  """bfloat16 compute (the training recipe's dtype): float32 residual stream and outputs."""
  model = DinoV3(embed_dim=16, num_heads=2, mlp_hidden=32, out_indices=(0, 1, 2, 3))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 32, 48, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), x)
  ref = model.apply(variables, x)
  bf16 = DinoV3(embed_dim=16, num_heads=2, mlp_hidden=32, out_indices=(0, 1, 2, 3),
                dtype=jnp.bfloat16).apply(variables, x)
  for a, b in zip(ref, bf16):
    assert b.dtype == jnp.float32 and b.shape == (1, 2, 3, 16)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0,
                               atol=0.05 * float(jnp.max(jnp.abs(a))))
