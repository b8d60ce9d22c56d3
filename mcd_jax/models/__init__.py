"""Neural networks: the transformer used as denoiser, autoregressive evaluator and baseline."""

from mcd_jax.models.transformer import count_params
from mcd_jax.models.transformer import forward_flops_per_token
from mcd_jax.models.transformer import from_config
from mcd_jax.models.transformer import matmul_params_per_token
from mcd_jax.models.transformer import train_flops_per_token
from mcd_jax.models.transformer import Transformer
