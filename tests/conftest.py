"""Test-wide set-up: several CPU devices for sharding tests, TensorFlow kept off accelerators."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax  # noqa: E402

# Must happen before the first JAX computation; 4 devices let tests compare 1- vs 4-way sharding.
jax.config.update("jax_num_cpu_devices", 4)

import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")
