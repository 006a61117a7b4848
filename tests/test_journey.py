"""The README's journey, literally: its commands, copied out of README.md, run in a copy of the
repository with the README's relative paths, one after the other, as a new user types them.

  train the quickstart (shortened) -> write its validation images as files -> predict on them
  with the training workdir as the checkpoint -> evaluate the masks against their ground truth
  -> export the workdir -> run the export in a process that never imports birefnet_jax.

Checked: every exit code; what each step writes (checkpoints, model_config.json, sample PNGs,
masks, scores, the artifact); that `evaluate` on the predicted files scores what the run's own
validation scored on the same images at the same resolution (within 1e-3); that the exported
artifact gives the masks `predict` wrote.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Shortened as CI allows: fewer steps and validation images, no grain worker start-up.
SHORTEN = ('--config.total_steps=12', '--config.log_every=4', '--config.eval_every=6',
           '--config.data.synthetic_val_examples=6', '--config.num_sample_images=3')


def readme_commands():
  """Every `python -m birefnet_jax...` command of the README's bash blocks, continuation lines
  joined, in order."""
  text = (ROOT / 'README.md').read_text()
  commands = []
  for block in re.findall(r'```bash\n(.*?)```', text, re.S):
    block = block.replace('\\\n', ' ')
    for line in block.splitlines():
      for part in line.split('&&'):
        part = part.split('#')[0].strip()
        if part.startswith('python -m birefnet_jax.'):
          commands.append(part)
  return commands


def find(commands, start):
  found = [c for c in commands if c.startswith(start)]
  assert found, f'the README has no command starting with {start!r}'
  return shlex.split(found[0])


def copy_repository(destination):
  """The repository's files as a fresh clone would have them (git's tracked and not-ignored
  files; without git, everything but virtual environments and run folders)."""
  try:
    listed = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
                            cwd=ROOT, capture_output=True, check=True).stdout.split(b'\0')
  except (OSError, subprocess.CalledProcessError):
    shutil.copytree(ROOT, destination, ignore=shutil.ignore_patterns(
        '.venv', 'venv', 'runs', '.git', '__pycache__', '*.egg-info'))
    return
  for name in filter(None, (n.decode() for n in listed)):
    source = ROOT / name
    if source.is_file():
      (destination / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(source, destination / name)


def run(argv, cwd, timeout=1800, **env):
  """One README command (argv[0] 'python' is this interpreter), as a user runs it."""
  if argv[0] == 'python':
    argv = [sys.executable, *argv[1:]]
  environ = {k: v for k, v in os.environ.items() if not k.startswith(('JAX_', 'XLA_'))}
  environ.update(PYTHONPATH=str(cwd), JAX_PLATFORMS='cpu', **env)
  proc = subprocess.run(argv, cwd=str(cwd), env=environ, capture_output=True, text=True,
                        timeout=timeout, check=False)
  return proc


@pytest.fixture(scope='module')
def journey(tmp_path_factory):
  """Runs the whole journey once; the tests below look at what it left."""
  home = tmp_path_factory.mktemp('fresh_clone')
  repo = home / 'birefnet_jax'
  repo.mkdir()
  copy_repository(repo)
  commands = readme_commands()
  steps = {}

  train = find(commands, 'python -m birefnet_jax.main --config configs/quickstart.py')
  assert '--workdir' in train and not os.path.isabs(train[train.index('--workdir') + 1])
  steps['train'] = run(train + list(SHORTEN) + ['--config.data.num_workers=0'], repo)
  workdir = repo / train[train.index('--workdir') + 1]

  steps['examples'] = run(find(commands, 'python -m birefnet_jax.data.write_examples') +
                          ['--config.data.synthetic_val_examples=6'], repo)
  steps['predict'] = run(find(commands, 'python -m birefnet_jax.predict --checkpoint runs/'), repo)
  steps['evaluate'] = run(find(commands, 'python -m birefnet_jax.evaluate --pred_dir demo'), repo)
  steps['export'] = run(find(commands, 'python -m birefnet_jax.export --checkpoint runs/'), repo)
  return dict(repo=repo, workdir=workdir, steps=steps, commands=commands)


def ok(journey, name):
  proc = journey['steps'][name]
  assert proc.returncode == 0, f'{name} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n' \
                               f'{proc.stderr[-6000:]}'
  return proc


def val_records(workdir):
  with open(workdir / 'metrics.jsonl') as f:
    return [r for r in map(json.loads, f) if r['kind'] == 'val']


def test_training_writes_a_workdir_that_is_a_checkpoint(journey):
  out = ok(journey, 'train').stdout
  workdir = journey['workdir']
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['12', '6']
  config = json.loads((workdir / 'model_config.json').read_text())
  assert config['backbone']['family'] == 'swin'
  # The final table, the sample panels as PNG files, and the next commands.
  assert re.search(r'final validation \(step 12\):\n.*set\s+Sm\s+maxFm', out), out[-3000:]
  import cv2  # pylint: disable=g-import-not-at-top
  for step in (6, 12):
    panel = cv2.imread(str(workdir / 'samples' / f'step_{step}.png'))
    assert panel is not None and panel.shape == (3 * 128, 3 * 128, 3)
  assert 'python -m birefnet_jax.predict --checkpoint runs/quickstart' in out


def test_predict_and_evaluate_score_what_training_validated(journey):
  ok(journey, 'examples')
  predict = ok(journey, 'predict')
  repo, workdir = journey['repo'], journey['workdir']
  # predict chose the best checkpoint by the run's validation metric (Sm) and said which.
  chosen = int(re.search(r'step (\d+), best Sm', predict.stderr + predict.stdout).group(1))
  records = {r['step']: r for r in val_records(workdir)}
  best = max(records, key=lambda s: (records[s]['synthetic-val/Sm'], s))
  assert chosen == best
  masks = sorted(os.listdir(repo / 'demo' / 'masks'))
  assert masks == sorted(os.listdir(repo / 'demo' / 'gt')) and len(masks) == 6
  ok(journey, 'evaluate')
  scores = json.loads((repo / 'demo' / 'scores.json').read_text())
  for metric in ('Sm', 'MAE', 'maxFm', 'meanFm', 'wFm', 'maxEm', 'meanEm'):
    assert abs(scores[metric] - records[best][f'synthetic-val/{metric}']) <= 1e-3, metric
  assert scores['n_images'] == 6


def test_exported_workdir_runs_without_the_package(journey):
  ok(journey, 'predict')
  ok(journey, 'export')
  repo = journey['repo']
  artifact = repo / 'quickstart.jaxexport'
  script = r'''
import sys, json
import cv2, jax, numpy as np
data = open(sys.argv[1], 'rb').read()
exported = jax.export.deserialize(bytearray(data))
names = sys.argv[2:]
mean, std = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
x = np.stack([(cv2.imread(n)[:, :, ::-1].astype(np.float32) / 255 - mean) / std for n in names])
probs = np.asarray(exported.call(x[:1]) if exported.in_avals[0].shape[0] == 1 else exported.call(x))
assert 'birefnet_jax' not in sys.modules
print(json.dumps(dict(shape=list(probs.shape), mask=(probs[0, :, :, 0] * 255).astype(np.uint8).tolist())))
'''
  image = sorted((repo / 'demo' / 'im').iterdir())[0]
  environ = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH',)}
  proc = subprocess.run([sys.executable, '-c', script, str(artifact), str(image)], cwd=str(repo.parent),
                        env=dict(environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['shape'] == [1, 128, 128, 1]   # the training resolution, from the workdir
  import cv2  # pylint: disable=g-import-not-at-top
  written = cv2.imread(str(repo / 'demo' / 'masks' / image.name), cv2.IMREAD_GRAYSCALE)
  exported = np.asarray(result['mask'], np.uint8)
  # Same weights, same resolution; float32 rounding may move a truncated level by one.
  assert np.abs(exported.astype(int) - written.astype(int)).max() <= 1
