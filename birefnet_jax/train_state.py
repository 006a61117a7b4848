"""The train state: everything a step reads and writes, one pytree (saved whole by orbax)."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: number of optimizer steps taken
  params: Any              # float32 parameters (also under bf16 compute)
  batch_stats: Any         # BatchNorm running statistics ({} for a model without BatchNorm)
  opt_state: Any

  @classmethod
  def create(cls, variables, optimizer: optax.GradientTransformation):
    params = variables['params']
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               batch_stats=variables.get('batch_stats', {}), opt_state=optimizer.init(params))

  @property
  def variables(self):
    """The flax variables for ``model.apply``."""
    if self.batch_stats:
      return {'params': self.params, 'batch_stats': self.batch_stats}
    return {'params': self.params}
