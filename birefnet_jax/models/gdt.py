"""OutRef's gradient ground truth: the Laplacian of the normalized input image.

In train mode the model computes it from its own input and multiplies it by each decoder level's
prediction to form the gradient labels (``gdt_labels``) the gradient loss compares against.
"""

import jax.numpy as jnp
from jax import lax
import numpy as np


def laplacian_gdt_gt(images_nhwc):
  """OutRef gradient GT: kornia ``laplacian(mean_c(x), kernel_size=5)``, (B, H, W, 1).

  kornia's 5x5 Laplacian is ones with centre -24, L1-normalised (/48), applied as a correlation
  with reflect padding (edge pixel not repeated). ``x`` is the *normalised* image.
  """
  if images_nhwc.ndim != 4:
    raise ValueError(f'laplacian_gdt_gt: expected (B, H, W, C) images, got shape '
                     f'{images_nhwc.shape}')
  dtype = images_nhwc.dtype
  gray = jnp.mean(images_nhwc, axis=-1, keepdims=True)
  kernel = np.ones((5, 5), np.dtype(dtype))
  kernel[2, 2] = 1 - 25
  kernel = kernel / np.abs(kernel).sum(dtype=np.dtype(dtype))   # kornia: normalized=True
  padded = jnp.pad(gray, ((0, 0), (2, 2), (2, 2), (0, 0)), mode='reflect')
  return lax.conv_general_dilated(
      padded, jnp.asarray(kernel, dtype)[:, :, None, None], window_strides=(1, 1),
      padding='VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=lax.Precision.HIGHEST)
