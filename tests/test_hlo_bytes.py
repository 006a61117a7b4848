"""tools/hlo_bytes.py: the bytes of each instruction of an optimized HLO text, by kind, add up
as counted by hand, and to XLA's own 'bytes accessed' on a compiled program."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'tools'))
import hlo_bytes  # pylint: disable=g-import-not-at-top,wrong-import-position

HLO = """HloModule m, entry_computation_layout={(bf16[4,8]{1,0}, bf16[8,9]{1,0})->f32[4,3,3]{2,1,0}}

%wrapped_convert_computation (param_0: bf16[4,8]) -> f32[4,8] {
  %param_0 = bf16[4,8]{1,0} parameter(0)
  ROOT %convert.1 = f32[4,8]{1,0} convert(%param_0)
}

ENTRY %main.9 (x.1: bf16[4,8], w.1: bf16[8,9]) -> f32[4,3,3] {
  %x.1 = bf16[4,8]{1,0} parameter(0)
  %w.1 = bf16[8,9]{1,0} parameter(1)
  %wrapped_convert = f32[4,8]{1,0} fusion(%x.1), kind=kLoop, calls=%wrapped_convert_computation
  %wrapped_convert.1 = f32[8,9]{1,0} fusion(%w.1), kind=kLoop, calls=%c2, metadata={op_name="a(b)"}
  %ynn_fusion = f32[4,9]{1,0} fusion(%wrapped_convert, %wrapped_convert.1), kind=kCustom, calls=%c3
  %bitcast.2 = f32[4,3,3]{2,1,0} bitcast(%ynn_fusion)
  %wrapped_convert.2 = bf16[4,9]{1,0} fusion(%ynn_fusion), kind=kLoop, calls=%c5
  %logits = f32[4,3,3]{2,1,0} fusion(%bitcast.2), kind=kLoop, calls=%c4
  ROOT %exponential.3 = f32[4,3,3]{2,1,0} exponential(%logits)
}
"""


def test_bytes_by_kind_of_a_handwritten_program():
  """Counted by hand (result + operands of each non-free instruction; a bitcast is free):
  converts feeding the dot 4*8*(4+2) + 8*9*(4+2) = 624; the dot 4*9*4 + 4*8*4 + 8*9*4 = 560;
  the other convert 4*9*(2+4) = 216; logits and the exponential reading them 2 * 2*36*4 = 576."""
  split = hlo_bytes.breakdown(HLO, window_tokens=3)
  assert split == {'attention logits': 576, 'converts feeding a dot/conv': 624,
                   'other converts': 216, 'dots and convolutions': 560, 'everything else': 0,
                   'total': 1976}
  without_windows = hlo_bytes.breakdown(HLO)
  assert without_windows['attention logits'] == 0
  assert without_windows['everything else'] == 576


def test_total_is_xla_bytes_accessed_on_a_compiled_program():
  """A bf16 attention-like program compiled for this machine: the recomputed total is XLA's
  'bytes accessed' (within 3 %: XLA counts a few instructions' operands its own way)."""
  def f(x, w, v):
    q = jnp.einsum('btc,cd->btd', x, w)
    logits = jnp.einsum('bqd,bkd->bqk', q, q).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(jnp.bfloat16)
    return jnp.einsum('bqk,bkd->bqd', probs, v)

  rng = np.random.default_rng(0)
  args = [jnp.asarray(rng.normal(size=s), jnp.bfloat16)
          for s in ((16, 49, 32), (32, 32), (16, 49, 32))]
  compiled = jax.jit(f).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  split = hlo_bytes.breakdown(compiled.as_text(), window_tokens=49)
  assert abs(split['total'] - cost['bytes accessed']) <= 0.03 * cost['bytes accessed']
  assert split['total'] == sum(split[k] for k in hlo_bytes.KINDS)
  # The (16, 49, 49) logits and softmax: written and read at least twice in float32.
  assert split['attention logits'] >= 2 * 16 * 49 * 49 * 4
