"""Official BiRefNet recipe for the HRSOD task (see configs/common.py).

  python -m birefnet_jax.main --config configs/hrsod.py --workdir W --config.data.root=DATA \
      [--config.init_from=CONVERTED_SWIN_L_IMAGENET] [--config.total_steps=N]
"""

import importlib.util
import os


def _common():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'common.py')
  spec = importlib.util.spec_from_file_location('birefnet_configs_common', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  return _common().recipe('HRSOD', arg=arg)
