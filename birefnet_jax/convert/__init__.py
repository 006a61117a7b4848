"""Conversion of official PyTorch BiRefNet checkpoints to Flax variables."""

from birefnet_jax.convert.convert import (CheckpointMismatchError, abstract_variables,
                                          convert_backbone_state_dict, convert_file,
                                          convert_state_dict, load_converted, load_converted_backbone,
                                          save_converted)
from birefnet_jax.convert.reading import read_state_dict
