"""PseudoSeg in JAX/Flax: semi- and weakly-supervised semantic segmentation."""

__version__ = "0.1.0"
