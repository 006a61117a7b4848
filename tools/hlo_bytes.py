"""Where the bytes go: the bytes each top-level instruction of a compiled program reads and
writes, from its optimized HLO text (``compiled.as_text()``), summed by kind.

XLA's cost analysis gives one total ('bytes accessed': every operand and result of every
instruction of the entry computation, a fusion counted at its boundary). This recomputes that
sum instruction by instruction (the shapes of results and operands, as printed) so it can be
split:

* ``attention logits``: results whose last two dimensions are one window's tokens x tokens
  (``window_tokens``, e.g. 144 for Swin-L's 12x12 windows) and the instructions reading them:
  the logits, bias, mask and softmax passes that a fused attention kernel keeps on chip.
* ``converts feeding a dot/conv``: fusions whose root is a dtype conversion and whose result
  goes straight into a dot or convolution. On a CPU these are mostly XLA's float normalization:
  its dot and convolution kernels take float32, so every bfloat16 operand is first converted
  (and the result comes out float32). A GPU runs those dots in bfloat16, so in a bf16 program
  this share is what the CPU proxy adds, not what a GPU moves.
* ``other converts``: the other conversion-rooted fusions.
* ``dots and convolutions``: the other dot/conv fusions (their operands and results).
* ``everything else``: elementwise, reductions, copies, concatenations, slices, gathers.

The format of HLO text is XLA's, not a stable API: ``total`` is printed beside XLA's own figure,
and a test checks on a small model that they agree.
"""

import collections
import re

DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f16': 2, 'bf16': 2, 's16': 2, 'u16': 2, 'f32': 4,
               's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}
_SHAPE = re.compile(r'\b(' + '|'.join(DTYPE_BYTES) + r')\[([0-9,]*)\]')
_INSTRUCTION = re.compile(r'\s*(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*)$')
_FREE = ('parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast')
KINDS = ('attention logits', 'converts feeding a dot/conv', 'other converts',
         'dots and convolutions', 'everything else')


def shape_bytes(text: str) -> int:
  """Bytes of every array shape written in ``text`` (a shape or a tuple of shapes)."""
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    count = 1
    for d in dims.split(','):
      if d:
        count *= int(d)
    total += count * DTYPE_BYTES[dtype]
  return total


def _last_two_dims(shape_text: str):
  found = _SHAPE.findall(shape_text)
  if len(found) != 1:
    return None
  dims = [int(d) for d in found[0][1].split(',') if d]
  return tuple(dims[-2:]) if len(dims) >= 2 else None


def _operand_text(rest: str) -> str:
  depth, i = 1, 0
  while depth and i < len(rest):
    depth += {'(': 1, ')': -1}.get(rest[i], 0)
    i += 1
  return rest[:i]


def entry_instructions(hlo_text: str):
  """[(name, result shape text, opcode, operand names)] of the ENTRY computation, and the bytes
  of every named value (parameters included)."""
  start = hlo_text.index('\nENTRY')
  body_start = hlo_text.index('{\n', start)
  sizes = {name: shape_bytes(shape) for name, shape in
           re.findall(r'([\w.\-]+): ((?:' + '|'.join(DTYPE_BYTES) + r')\[[0-9,]*\])',
                      hlo_text[start:body_start])}
  body = hlo_text[body_start:]
  body = body[:body.index('\n}')]
  instructions = []
  for line in body.split('\n')[1:]:
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, opcode, rest = match.groups()
    sizes[name] = shape_bytes(shape)
    instructions.append((name, shape, opcode, re.findall(r'%([\w.\-]+)', _operand_text(rest))))
  return instructions, sizes


def _is_dot_or_conv(name: str, opcode: str) -> bool:
  return (opcode in ('dot', 'convolution') or name.startswith(('ynn_fusion', 'xnn_fusion',
                                                               'onednn')) or
          'dot' in name.split('.')[0] or 'convolution' in name.split('.')[0])


def breakdown(hlo_text: str, window_tokens: int = 0):
  """{kind: bytes} over ``KINDS`` plus 'total' (XLA's 'bytes accessed', recomputed)."""
  instructions, sizes = entry_instructions(hlo_text)
  users = collections.defaultdict(list)
  for name, _, opcode, operands in instructions:
    for operand in operands:
      users[operand].append((name, opcode))
  logits = set()
  if window_tokens:
    logits = {name for name, shape, _, _ in instructions
              if _last_two_dims(shape) == (window_tokens, window_tokens)}
  totals = dict.fromkeys(KINDS, 0)
  for name, shape, opcode, operands in instructions:
    if opcode in _FREE:
      continue
    nbytes = sizes[name] + sum(sizes.get(o, 0) for o in operands)
    is_convert = opcode == 'convert' or name.startswith(('wrapped_convert', 'convert'))
    if name in logits or any(o in logits for o in operands):
      kind = 'attention logits'
    elif is_convert and any(_is_dot_or_conv(u, op) for u, op in users[name]):
      kind = 'converts feeding a dot/conv'
    elif is_convert:
      kind = 'other converts'
    elif _is_dot_or_conv(name, opcode):
      kind = 'dots and convolutions'
    else:
      kind = 'everything else'
    totals[kind] += nbytes
  totals['total'] = sum(totals[k] for k in KINDS)
  return totals
