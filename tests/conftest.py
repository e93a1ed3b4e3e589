"""Test-wide settings."""

import jax

# fp32 parity tests compare against fp32 oracles at 1e-5: on GPUs XLA's default fp32 matmul precision is TF32.
jax.config.update("jax_default_matmul_precision", "highest")
