"""mcd_jax: masked diffusion language models and Masked Consistency Distillation.

Importing mcd_jax (or any of its modules) initialises no JAX backend, so
`jax.distributed.initialize` can still run first in multi-host jobs.
"""

__version__ = '0.1.0'
