"""Official weights by their Hub name, through huggingface_hub's real download code, offline: a
tiny HTTP server on 127.0.0.1 poses as the Hub (HF_ENDPOINT) and serves a fixture checkpoint."""

import hashlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip('huggingface_hub')

from birefnet_jax import model_loading  # pylint: disable=wrong-import-position
from birefnet_jax.convert import convert_file, hub, releases  # pylint: disable=wrong-import-position
from birefnet_jax.convert.names import flatten  # pylint: disable=wrong-import-position
from birefnet_jax.errors import UserError  # pylint: disable=wrong-import-position

import reference  # pylint: disable=wrong-import-position

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = reference.path('swin_w12_tiny_legacy.safetensors')   # trained with the legacy order
COMMIT = 'a' * 40


class FakeHub(http.server.ThreadingHTTPServer):
  """Serves ``/{repo}/resolve/{revision}/model.safetensors`` for the repos in ``files`` as the
  Hub does (X-Repo-Commit, ETag, Content-Length); counts the requests of each path."""

  def __init__(self, files):
    self.files = files
    self.requests = []
    super().__init__(('127.0.0.1', 0), FakeHubHandler)

  @property
  def url(self):
    return f'http://127.0.0.1:{self.server_address[1]}'


class FakeHubHandler(http.server.BaseHTTPRequestHandler):

  def log_message(self, *args):   # quiet
    pass

  def _answer(self, body: bool):
    self.server.requests.append((self.command, self.path))
    parts = self.path.split('?')[0].strip('/').split('/')
    if len(parts) < 5 or parts[2] != 'resolve' or '/'.join(parts[:2]) not in self.server.files:
      self.send_response(404)
      self.send_header('X-Error-Code', 'RepositoryNotFound')
      self.send_header('Content-Length', '0')
      self.end_headers()
      return
    data = self.server.files['/'.join(parts[:2])]
    self.send_response(200)
    self.send_header('X-Repo-Commit', COMMIT)
    self.send_header('ETag', f'"{hashlib.sha256(data).hexdigest()}"')
    self.send_header('Content-Length', str(len(data)))
    self.send_header('Content-Type', 'application/octet-stream')
    self.end_headers()
    if body:
      self.wfile.write(data)

  def do_HEAD(self):  # pylint: disable=invalid-name
    self._answer(body=False)

  def do_GET(self):  # pylint: disable=invalid-name
    self._answer(body=True)


@pytest.fixture()
def fake_hub(tmp_path, monkeypatch):
  """The loopback Hub serving the legacy fixture as ZhengPeng7/BiRefNet (an official, legacy-
  order release) and as some-user/finetuned (unknown to the release table); empty caches."""
  import huggingface_hub.constants  # pylint: disable=g-import-not-at-top
  data = FIXTURE.read_bytes()
  server = FakeHub({'ZhengPeng7/BiRefNet': data, 'some-user/finetuned': data})
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  env = {'HF_ENDPOINT': server.url, 'HF_HOME': str(tmp_path / 'hf'),
         'BIREFNET_JAX_CACHE': str(tmp_path / 'cache'), 'HF_HUB_DISABLE_XET': '1',
         'HF_HUB_DISABLE_TELEMETRY': '1'}
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
  # huggingface_hub reads its cache folder at import: point the imported module at ours too.
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hf' / 'hub'))
  yield server, env
  server.shutdown()
  server.server_close()


def _same_variables(folder, expected):
  _, loaded = model_loading.load_model(folder)
  got, want = flatten(loaded), flatten(expected)
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=str(key))


def test_release_table_orders():
  """Releases before 2024-11-05 are legacy, those of 2025 current (official-birefnet.md §12)."""
  assert releases.find_release('zhengpeng7/birefnet').inref_order == 'legacy'
  assert releases.find_release('ZhengPeng7/BiRefNet_lite').backbone == 'swin_v1_t'
  for name in ('BiRefNet_HR', 'BiRefNet_HR-matting', 'BiRefNet_dynamic'):
    assert releases.find_release(f'ZhengPeng7/{name}').inref_order == 'current'
  assert releases.find_release('ZhengPeng7/BiRefNet_HR').resolution == (2048, 2048)
  assert releases.find_release('someone/else') is None
  assert hub.parse_hub_name('ZhengPeng7/BiRefNet@v1.0') == ('ZhengPeng7/BiRefNet', 'v1.0')
  assert hub.parse_hub_name('/abs/path') is None
  assert hub.parse_hub_name('model.safetensors') is None


def test_convert_by_hub_name_downloads_and_picks_the_order(fake_hub, tmp_path):
  """The converter command line: download through the loopback Hub, the release's legacy order
  chosen, the same variables as converting the file itself; an unknown repo needs the order."""
  server, env = fake_hub
  tool = [sys.executable, str(ROOT / 'tools' / 'convert_torch_weights.py')]
  run_env = dict(os.environ, **env)
  done = subprocess.run(tool + ['ZhengPeng7/BiRefNet', str(tmp_path / 'general')],
                        env=run_env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'inref_order=legacy' in done.stdout
  assert ('GET', '/ZhengPeng7/BiRefNet/resolve/main/model.safetensors') in server.requests
  _, expected, _, _ = convert_file(str(FIXTURE), None, inref_order='legacy')
  _same_variables(str(tmp_path / 'general'), expected)
  config = (tmp_path / 'general' / 'model_config.json').read_text()
  assert '"inref_order": "legacy"' in config

  unknown = subprocess.run(tool + ['some-user/finetuned', str(tmp_path / 'unknown')],
                           env=run_env, capture_output=True, text=True, timeout=600)
  assert unknown.returncode == 1
  assert 'InRef patch order is unknown' in unknown.stderr and '--inref-order' in unknown.stderr
  assert not (tmp_path / 'unknown').exists()


def test_unknown_repo_with_order_and_missing_repo(fake_hub, tmp_path):
  """--inref-order makes an unknown repo convertible (via the library calls the tool makes); a
  repo the Hub does not have is a UserError naming it."""
  assert hub.inref_order_for('some-user/finetuned', 'current') == 'current'
  with pytest.raises(UserError, match='InRef patch order is unknown'):
    hub.inref_order_for('some-user/finetuned')
  path = hub.download_checkpoint('some-user/finetuned')
  assert Path(path).read_bytes() == FIXTURE.read_bytes()
  with pytest.raises(UserError, match='ZhengPeng7/BiRefNet_HR'):
    hub.download_checkpoint('ZhengPeng7/BiRefNet_HR')


def test_checkpoint_by_hub_name_converts_once_into_the_cache(fake_hub, tmp_path):
  """``--checkpoint ZhengPeng7/BiRefNet`` (what predict and export call): downloaded and
  converted on first use, then loaded from the cache without asking the Hub again."""
  server, env = fake_hub
  loaded = model_loading.load('ZhengPeng7/BiRefNet')
  assert loaded.model.cfg.inref_order == 'legacy'
  assert loaded.resolution == (1024, 1024)
  folder = hub.converted_folder('ZhengPeng7/BiRefNet')
  assert folder.startswith(env['BIREFNET_JAX_CACHE'])
  _, expected, _, _ = convert_file(str(FIXTURE), None, inref_order='legacy')
  _same_variables(folder, expected)
  asked = len(server.requests)
  assert asked >= 1
  again = model_loading.load('ZhengPeng7/BiRefNet')
  assert len(server.requests) == asked   # from the cache, no request
  assert again.model.cfg.to_dict() == loaded.model.cfg.to_dict()
  with pytest.raises(UserError, match='official BiRefNet release') as caught:
    model_loading.load('some-user/finetuned')
  assert 'tools/convert_torch_weights.py' in caught.value.hint
