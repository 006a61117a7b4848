"""BiRefNet modules: backbones, decoder blocks, the whole model."""
