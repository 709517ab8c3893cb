"""Test set-up: 8 simulated CPU devices and fast compiles, fixed before JAX is imported."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import jax  # noqa: E402

# Tests compare numbers, not speed: cheaper compiles keep the suite fast on 2 cores.
jax.config.update('jax_disable_most_optimizations', True)
