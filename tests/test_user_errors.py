"""Issue 12: nothing a user owns is ever lost, and every user error is one clear line.

Each case runs a command line (its ``main(argv)``, or a subprocess where the umask, worker
processes or absl's flag parsing are part of the case) and checks the exit status, the message
(naming the file, no traceback) and that the user's files are untouched.
"""

import importlib.util
import json
import os
from pathlib import Path
import re
import shutil
import stat
import subprocess
import sys
import tempfile

import cv2
import numpy as np
from PIL import Image
import pytest

from birefnet_jax import evaluate, export, predict, writing
from birefnet_jax.convert import convert_file

import reference

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = reference.REFERENCE
FIXTURE = REFERENCE / 'swin_w7_tiny_cls.safetensors'
METRICS = REFERENCE / 'metrics'
UMASK = 0o027
MISSING_CHECKPOINT = '/nonexistent/checkpoint'   # a check that runs after loading would say so


def load_converter_tool():
  spec = importlib.util.spec_from_file_location('convert_torch_weights',
                                                ROOT / 'tools' / 'convert_torch_weights.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


CONVERTER = load_converter_tool()


def run_python(args, umask=None, env=None, timeout=300):
  """A subprocess of this interpreter in the repository root (PYTHONPATH inherited), under
  ``umask`` if given (set by a shell: preexec_fn is unsafe in a process running JAX threads)."""
  command = [sys.executable, *args]
  if umask is not None:
    command = ['sh', '-c', f'umask {umask:03o} && exec "$0" "$@"', *command]
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env=env)


def one_error(stderr, *fragments):
  """The stderr of a user error: an 'error:' line containing every fragment, at most a 'hint:'
  line besides, and no traceback."""
  assert 'Traceback' not in stderr, stderr
  lines = [l for l in stderr.splitlines() if l.startswith(('error:', 'hint:'))]
  errors = [l for l in lines if l.startswith('error:')]
  assert len(errors) == 1, stderr
  for fragment in fragments:
    assert fragment in errors[0], (fragment, stderr)
  return errors[0]


def mode(path):
  return stat.S_IMODE(os.stat(path).st_mode)


def snapshot(folder):
  """{relative path: bytes} of every file under ``folder``."""
  folder = Path(folder)
  return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob('*') if p.is_file()}


def _cannot_create_in(folder):
  try:
    fd, name = tempfile.mkstemp(dir=folder)
  except OSError:
    return True
  os.close(fd)
  os.remove(name)
  return False


@pytest.fixture
def read_only_folder(tmp_path):
  """A folder no file can be created in: mode 0555 for a normal user; root writes anywhere, so
  for root the read-only file system /sys."""
  if os.geteuid() != 0:
    folder = tmp_path / 'read_only'
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)
  elif _cannot_create_in('/sys'):
    yield Path('/sys')
  else:
    pytest.skip('no read-only folder for root on this machine')


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  dst = tmp_path_factory.mktemp('user_errors_model') / 'tiny'
  convert_file(str(FIXTURE), str(dst))
  return dst


@pytest.fixture
def photos(tmp_path):
  """A user's folder D with a photo, an animated GIF and notes."""
  folder = tmp_path / 'D'
  folder.mkdir()
  rng = np.random.default_rng(0)
  cv2.imwrite(str(folder / 'cat.png'), rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
  frames = [Image.fromarray(np.full((30, 20, 3), 60 * i, np.uint8)) for i in range(3)]
  frames[0].save(folder / 'anim.gif', save_all=True, append_images=frames[1:])
  (folder / 'notes.txt').write_text('mine')
  return folder


# ------------------------------------------------------------------------------------------
# Converter.

def convert(argv, capsys):
  status = CONVERTER.main([str(a) for a in argv])
  return status, capsys.readouterr().err


def test_converter_overwrite_never_replaces_a_foreign_folder(tmp_path, capsys):
  dst = tmp_path / 'dst'
  (dst / 'other_project').mkdir(parents=True)
  (dst / 'README.txt').write_text('my readme')
  (dst / 'other_project' / 'notes.txt').write_text('my notes')
  before = snapshot(dst)
  status, err = convert([FIXTURE, dst, '--overwrite'], capsys)
  assert status == 1
  one_error(err, str(dst), 'not a converter output', 'README.txt')
  assert snapshot(dst) == before
  # Nothing of ours left beside it either (no staging folder).
  assert sorted(p.name for p in tmp_path.iterdir()) == ['dst']


def test_converter_dst_file_is_refused_even_with_overwrite(tmp_path, capsys):
  dst = tmp_path / 'weights.bin'
  dst.write_bytes(b'user data')
  status, err = convert([FIXTURE, dst, '--overwrite'], capsys)
  assert status == 1
  one_error(err, str(dst), 'is a file')
  assert dst.read_bytes() == b'user data'


def test_converter_dst_in_read_only_folder(read_only_folder, capsys):
  status, err = convert([FIXTURE, read_only_folder / 'converted'], capsys)
  assert status == 1
  one_error(err, 'cannot write in', str(read_only_folder))


def test_converter_overwrite_replaces_its_own_output_with_umask_modes(converted, tmp_path):
  dst = tmp_path / 'dst'
  shutil.copytree(converted, dst)
  (dst / 'model_config.json').write_text('{"stale": true}')
  result = run_python(['tools/convert_torch_weights.py', str(FIXTURE), str(dst), '--overwrite'],
                      umask=UMASK)
  assert result.returncode == 0, result.stderr
  assert json.loads((dst / 'model_config.json').read_text())['backbone']['family'] == 'swin'
  assert mode(dst) == 0o777 & ~UMASK                          # mkdtemp alone gives 0700
  assert mode(dst / 'model_config.json') == 0o666 & ~UMASK
  assert sorted(p.name for p in tmp_path.iterdir()) == ['dst']   # old copy and staging gone


@pytest.mark.parametrize('name, content, fragment', [
    ('empty.safetensors', b'', 'empty file'),
    ('truncated.safetensors', FIXTURE.read_bytes()[:5000], 'truncated or corrupt'),
    ('empty.pth', b'', 'empty file'),
    ('notes.pth', b'hello, this is text\n', 'neither a safetensors nor a torch file'),
])
def test_converter_unreadable_source_is_one_line(tmp_path, capsys, name, content, fragment):
  src = tmp_path / name
  src.write_bytes(content)
  status, err = convert([src, tmp_path / 'out'], capsys)
  assert status == 1
  one_error(err, str(src), fragment)
  assert not (tmp_path / 'out').exists()


class NotATensor:
  """A pickled object that a weights_only load refuses."""


def test_converter_never_advises_weights_only_false(tmp_path, capsys):
  torch = pytest.importorskip('torch')
  src = tmp_path / 'objects.pth'
  torch.save({'weights': torch.zeros(2), 'note': NotATensor()}, src)
  truncated = tmp_path / 'truncated.pth'
  torch.save({'w': torch.zeros(100)}, truncated)
  truncated.write_bytes(truncated.read_bytes()[:200])
  for path, fragment in ((src, 'safe load refuses'), (truncated, 'truncated or corrupt')):
    status, err = convert([path, tmp_path / 'out'], capsys)
    assert status == 1
    one_error(err, str(path), fragment)
    assert 'weights_only=False' not in err and 'weights_only` set to `False' not in err


def test_safetensors_named_pth_is_read_as_safetensors(tmp_path, capsys):
  src = tmp_path / 'model.pth'
  shutil.copy(FIXTURE, src)
  status, err = convert([src, tmp_path / 'out'], capsys)
  assert status == 0, err
  assert (tmp_path / 'out' / 'model_config.json').is_file()


# ------------------------------------------------------------------------------------------
# Predict: refusals happen before any model is loaded (the checkpoint does not even exist).

def predict_main(argv, capsys):
  status = predict.main([str(a) for a in argv])
  return status, capsys.readouterr().err


def test_predict_output_folder_equal_to_input_is_refused(photos, capsys):
  before = snapshot(photos)
  status, err = predict_main(['--checkpoint', MISSING_CHECKPOINT, '--input', photos,
                              '--output', photos, '--overwrite'], capsys)
  assert status == 1
  one_error(err, f'--output {photos} holds the input {photos}{os.sep}')
  assert snapshot(photos) == before


def test_predict_output_folder_holding_a_given_input_file_is_refused(photos, capsys):
  status, err = predict_main(['--checkpoint', MISSING_CHECKPOINT, '--input', photos / 'cat.png',
                              '--output', photos, '--cutout', '--cutout_dir', photos / 'cut'],
                             capsys)
  assert status == 1
  one_error(err, str(photos / 'cat.png'))
  status, err = predict_main(['--checkpoint', MISSING_CHECKPOINT, '--input', photos / 'cat.png',
                              '--output', photos.parent / 'masks', '--cutout', '--cutout_dir',
                              photos], capsys)
  assert status == 1
  one_error(err, f'--cutout_dir {photos} holds the input')


def test_predict_output_that_is_a_file_or_read_only(photos, tmp_path, read_only_folder, capsys):
  a_file = tmp_path / 'masks.png'
  a_file.write_bytes(b'mine')
  status, err = predict_main(['--checkpoint', MISSING_CHECKPOINT, '--input', photos,
                              '--output', a_file, '--overwrite'], capsys)
  assert status == 1
  one_error(err, f'--output {a_file} is a file')
  assert a_file.read_bytes() == b'mine'
  status, err = predict_main(['--checkpoint', MISSING_CHECKPOINT, '--input', photos,
                              '--output', read_only_folder / 'masks'], capsys)
  assert status == 1
  one_error(err, 'cannot write in', str(read_only_folder))


def test_predict_overwrite_never_replaces_a_folder(photos, tmp_path, capsys):
  out = tmp_path / 'masks'
  (out / 'cat.png').mkdir(parents=True)
  (out / 'cat.png' / 'keep.txt').write_text('mine')
  status, err = predict_main(['--checkpoint', MISSING_CHECKPOINT, '--input', photos / 'cat.png',
                              '--output', out, '--overwrite'], capsys)
  assert status == 1
  one_error(err, str(out / 'cat.png'), 'is a folder')
  assert (out / 'cat.png' / 'keep.txt').read_text() == 'mine'


def test_predict_nested_output_gif_warning_umask_and_rerun(converted, photos, capsys):
  """Output inside the input folder: masks are written with the umask's modes, the animated GIF
  gets a warning naming it, and a rerun with --skip_existing does not take masks for images."""
  out = photos / 'masks'
  argv = ['-m', 'birefnet_jax.predict', '--checkpoint', str(converted), '--input', str(photos),
          '--output', str(out), '--resolution', '64x64', '--cutout']
  result = run_python(argv, umask=UMASK)
  assert result.returncode == 0, result.stderr
  assert f'{out} lies inside the input folder' in result.stderr
  assert f'warning: {photos / "anim.gif"}: animated (3 frames)' in result.stderr
  for name in ('cat.png', 'anim.png', 'cutout/cat.png', 'cutout/anim.png'):
    assert mode(out / name) == 0o666 & ~UMASK, name          # mkstemp alone gives 0600
  assert cv2.imread(str(out / 'anim.png'), cv2.IMREAD_UNCHANGED).shape == (30, 20)
  masks = snapshot(out)
  status = predict.main(argv[2:] + ['--skip_existing'])   # in-process: no model is loaded
  assert status == 0
  assert 'nothing to do' in capsys.readouterr().err
  assert snapshot(out) == masks and not (out / 'masks').exists()


# ------------------------------------------------------------------------------------------
# Export.

def test_export_output_folder_or_read_only_is_refused_before_loading(tmp_path, read_only_folder,
                                                                     capsys):
  folder = tmp_path / 'model.jaxexport'
  folder.mkdir()
  (folder / 'keep.txt').write_text('mine')
  status = export.main(['--checkpoint', MISSING_CHECKPOINT, '--output', str(folder),
                        '--overwrite'])
  assert status == 1
  one_error(capsys.readouterr().err, f'--output {folder} is a folder')
  assert (folder / 'keep.txt').read_text() == 'mine'
  status = export.main(['--checkpoint', MISSING_CHECKPOINT, '--output',
                        str(read_only_folder / 'model.jaxexport')])
  assert status == 1
  one_error(capsys.readouterr().err, 'cannot write in')


def test_atomic_writes_follow_the_umask(tmp_path):
  """The one writer of masks, cut-outs, export artifacts and --json files, in a process whose
  umask is 027 from the start."""
  code = ('import sys; from birefnet_jax import writing; '
          'writing.write_atomically(sys.argv[1], b"data")')
  result = run_python(['-c', code, str(tmp_path / 'sub' / 'artifact')], umask=UMASK)
  assert result.returncode == 0, result.stderr
  assert (tmp_path / 'sub' / 'artifact').read_bytes() == b'data'
  assert mode(tmp_path / 'sub' / 'artifact') == 0o666 & ~UMASK
  assert writing.file_mode() == 0o666 & ~writing.UMASK


# ------------------------------------------------------------------------------------------
# Evaluate.

def metric_pairs(folder, names=('border_touching', 'centroid_half', 'const_mid_pred')):
  (folder / 'gt').mkdir(parents=True)
  (folder / 'pred').mkdir()
  for name in names:
    shutil.copy(METRICS / 'gt' / f'{name}.png', folder / 'gt')
    shutil.copy(METRICS / 'pred' / f'{name}.png', folder / 'pred')
  return folder / 'gt', folder / 'pred'


def test_evaluate_unreadable_prediction_is_one_line_from_worker_processes(tmp_path):
  gt, pred = metric_pairs(tmp_path)
  victim = pred / 'centroid_half.png'
  victim.write_bytes(b'')
  result = run_python(['-m', 'birefnet_jax.evaluate', '--gt_dir', str(gt), '--pred_dir',
                       str(pred), '--workers', '2', '--no_hce'])
  assert result.returncode == 1
  one_error(result.stderr, f'prediction {victim}', 'cannot be read as an image')
  assert 'RemoteTraceback' not in result.stderr


def test_evaluate_unreadable_gt_is_one_line(tmp_path, capsys):
  gt, pred = metric_pairs(tmp_path)
  victim = gt / 'centroid_half.png'
  victim.write_bytes(b'not a png')
  status, out = evaluate_main(['--gt_dir', gt, '--pred_dir', pred], capsys)
  assert status == 1
  one_error(out.err, f'GT {victim}', 'cannot be read as an image')


def evaluate_main(argv, capsys):
  try:
    evaluate.main([str(a) for a in argv] + ['--workers', '1', '--quiet', '--no_hce'])
  except SystemExit as e:
    return e.code, capsys.readouterr()
  return 0, capsys.readouterr()


def test_evaluate_json_target_checked_before_evaluating(tmp_path, read_only_folder, capsys):
  gt, pred = metric_pairs(tmp_path)
  status, out = evaluate_main(['--gt_dir', gt, '--pred_dir', pred, '--json',
                               read_only_folder / 'scores.json'], capsys)
  assert status == 1
  one_error(out.err, '--json', 'cannot write in')
  assert 'Dataset' not in out.out                             # nothing was evaluated
  status, out = evaluate_main(['--gt_dir', gt, '--pred_dir', pred, '--json', tmp_path], capsys)
  assert status == 1
  one_error(out.err, f'--json {tmp_path} is a folder')


def test_evaluate_plot_target_checked_before_evaluating(tmp_path, read_only_folder, capsys):
  pytest.importorskip('matplotlib')
  gt, pred = metric_pairs(tmp_path)
  status, out = evaluate_main(['--gt_dir', gt, '--pred_dir', pred, '--plot',
                               read_only_folder / 'curves'], capsys)
  assert status == 1
  one_error(out.err, '--plot', 'cannot write in')
  assert 'Dataset' not in out.out                             # nothing was evaluated
  (tmp_path / 'a_file').write_text('')
  status, out = evaluate_main(['--gt_dir', gt, '--pred_dir', pred, '--plot',
                               tmp_path / 'a_file'], capsys)
  assert status == 1
  one_error(out.err, f'--plot {tmp_path / "a_file"} is a file, not a folder')


def test_evaluate_skip_missing_with_nothing_left_fails(tmp_path, capsys):
  gt, _ = metric_pairs(tmp_path)
  empty = tmp_path / 'no_predictions'
  empty.mkdir()
  scores = tmp_path / 'scores.json'
  status, out = evaluate_main(['--gt_dir', gt, '--pred_dir', empty, '--skip_missing',
                               '--json', scores], capsys)
  assert status == 1
  one_error(out.err, 'nothing to evaluate', str(empty))
  assert not scores.exists()


def test_evaluate_tiny_image_warns_and_keeps_the_value(tmp_path, capsys):
  gt, pred = metric_pairs(tmp_path, names=('centroid_half',))
  cv2.imwrite(str(gt / 'dot.png'), np.full((1, 1), 255, np.uint8))
  cv2.imwrite(str(pred / 'dot.png'), np.full((1, 1), 255, np.uint8))
  scores = tmp_path / 'scores.json'
  status, out = evaluate_main(['--gt_dir', gt, '--pred_dir', pred, '--json', scores], capsys)
  assert status == 0
  warnings = [l for l in out.err.splitlines() if l.startswith('warning:')]
  assert len(warnings) == 2 and str(gt / 'dot.png') in warnings[0] and '1x1' in warnings[0]
  # A full GT has no boundary: left out of mBA, by name.
  assert '1 of 2 GT images have no boundary' in warnings[1] and 'dot' in warnings[1]
  assert json.loads(scores.read_text())['maxEm'] > 1e15      # faithful to pysodmetrics
  assert mode(scores) == 0o666 & ~writing.UMASK


# ------------------------------------------------------------------------------------------
# Training command line.

def run_main(*overrides, devices=1, workdir):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu')
  return run_python(['-m', 'birefnet_jax.main', '--config', 'configs/quickstart.py',
                     '--workdir', str(workdir), *overrides], env=env, timeout=120)


def test_main_unknown_config_field_lists_the_closest_names(tmp_path):
  result = run_main('--config.data.rooot=/data', workdir=tmp_path / 'w')
  assert result.returncode == 1
  one_error(result.stderr, '--config.data.rooot', "no field 'data.rooot'")
  assert 'hint: did you mean --config.data.root?' in result.stderr
  result = run_main('--config.model.backbonee.depths=(1,1,1,1)', workdir=tmp_path / 'w')
  assert result.returncode == 1
  one_error(result.stderr, "no field 'model.backbonee'")
  # The closest name comes first (model.freeze_backbone is also close since DINOv3).
  assert re.search(r'did you mean --config\.model\.backbone[ ?]', result.stderr), result.stderr
  result = run_main('--config.compilation_cache=false', workdir=tmp_path / 'w')
  assert result.returncode == 1
  one_error(result.stderr, "no field 'compilation_cache'")
  assert '--compilation_cache is a flag of its own' in result.stderr


def test_main_batch_not_divisible_and_missing_data_root_fail_before_training(tmp_path):
  workdir = tmp_path / 'w'
  result = run_main('--config.batch_size=3', devices=2, workdir=workdir)
  assert result.returncode == 1
  one_error(result.stderr, 'global batch size 3', 'number of devices (2)')
  result = run_main('--config.data.source=folder', workdir=workdir)
  assert result.returncode == 1
  one_error(result.stderr, 'data.root')
  result = run_main('--config.data.source=folder', f'--config.data.root={tmp_path / "nowhere"}',
                    workdir=workdir)
  assert result.returncode == 1
  one_error(result.stderr, str(tmp_path / 'nowhere'))
  assert not workdir.exists()                                 # stopped before training began


def _official_layout(root, names, unpaired=(), garbage=()):
  """ROOT/DIS5K/{DIS-TR,DIS-VD}/{im,gt} of small random PNGs; ``unpaired`` images get no mask,
  ``garbage`` images are text files."""
  rng = np.random.default_rng(0)
  for dataset, count in names.items():
    for i in range(count):
      stem = f'{dataset}_{i:02d}'
      for sub, shape in (('im', (64, 64, 3)), ('gt', (64, 64))):
        folder = root / 'DIS5K' / dataset / sub
        folder.mkdir(parents=True, exist_ok=True)
        if sub == 'gt' and stem in unpaired:
          continue
        if sub == 'im' and stem in garbage:
          (folder / f'{stem}.png').write_text('not an image')
          continue
        cv2.imwrite(str(folder / f'{stem}.png'), rng.integers(0, 256, shape, np.uint8))
  return root


def test_tfds_builders_missing_root_and_unpaired_image_are_one_line(tmp_path):
  result = run_python(['-m', 'birefnet_jax.data.tfds_builders', '--task', 'DIS5K', '--root',
                       str(tmp_path / 'nowhere'), '--data_dir', str(tmp_path / 'tfds')])
  assert result.returncode == 1
  one_error(result.stderr, str(tmp_path / 'nowhere' / 'DIS5K'), 'not found')
  root = _official_layout(tmp_path / 'data', {'DIS-TR': 3}, unpaired=('DIS-TR_01',))
  result = run_python(['-m', 'birefnet_jax.data.tfds_builders', '--task', 'DIS5K', '--root',
                       str(root), '--data_dir', str(tmp_path / 'tfds')])
  assert result.returncode == 1
  one_error(result.stderr, 'DIS-TR_01.png has no mask')
  assert 'hint: set data.on_bad_file=' in result.stderr


FOLDER_DATA = ('--config.data.source=folder', '--config.data.train_sets=DIS-TR',
               '--config.data.val_sets=DIS-VD', '--config.data.image_size=(64, 64)')


def test_main_unpaired_image_fails_before_training(tmp_path):
  root = _official_layout(tmp_path / 'data', {'DIS-TR': 8, 'DIS-VD': 2}, unpaired=('DIS-TR_03',))
  workdir = tmp_path / 'w'
  result = run_main(*FOLDER_DATA, f'--config.data.root={root}', workdir=workdir)
  assert result.returncode == 1
  one_error(result.stderr, 'DIS-TR_03.png has no mask')
  assert not (workdir / 'checkpoints').exists()


def test_main_unreadable_validation_image_stops_the_run_in_one_line(tmp_path):
  """The error comes after a train step, from validation, with a grain worker running: one error
  line naming the file, exit 1. (grain still leaves the shared-memory blocks of one batch to
  Python's resource tracker on this path; a run that ends normally leaves none, see
  test_train.py.)"""
  root = _official_layout(tmp_path / 'data', {'DIS-TR': 8, 'DIS-VD': 2}, garbage=('DIS-VD_01',))
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = run_python(['-m', 'birefnet_jax.main', '--config', 'configs/quickstart.py',
                       '--workdir', str(tmp_path / 'w'), *FOLDER_DATA,
                       f'--config.data.root={root}', '--config.total_steps=1',
                       '--config.eval_every=1', '--config.data.num_workers=1',
                       # The quickstart reduced (one backbone pass, no InRef, no context
                       # features): its train and eval steps compile several times faster.
                       '--config.model.mul_scl_ipt=', '--config.model.dec_ipt=False',
                       '--config.model.cxt_num=0'],
                      env=env, timeout=900)
  assert result.returncode == 1, result.stderr[-3000:]
  one_error(result.stderr, 'DIS-VD_01.png', 'not a readable image')
  assert 'step 1: first step done' in result.stdout + result.stderr   # it failed while running


def test_main_bad_config_variant_is_one_line(tmp_path):
  # The config file's variant (configs/dis.py:KEY=VALUE,...) is read while absl parses the flags:
  # a bad one is one line naming it, before anything is built or written.
  result = run_python(['-m', 'birefnet_jax.main',
                       '--config', 'configs/dis.py:backbone=swin_v1_t,size=500',
                       '--workdir', str(tmp_path / 'run')])
  assert result.returncode == 1
  one_error(result.stderr, 'size=500', 'multiples of 32')
  assert not (tmp_path / 'run').exists()
