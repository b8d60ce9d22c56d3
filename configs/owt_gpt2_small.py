r"""Paper-scale teacher: about 170M parameters, L = 1024, GPT-2 tokenizer, OpenWebText.

OpenWebText must be prepared beforehand, either as TFDS array_record files in
$TFDS_DATA_DIR (data.source='tfds', data.tfds_name='openwebtext') or as text
files under $MCD_DATA_DIR (data.source='files'). The GPT-2 tokenizer files
vocab.json and merges.txt must be in data.tokenizer_path:

  python -m mcd_jax.main --config configs/owt_gpt2_small.py --workdir gs://BUCKET/owt \
      --config.data.tokenizer_path=/path/to/gpt2

The smoke variant keeps the architecture's shape at a tiny size and trains a
SentencePiece tokenizer on Tiny Shakespeare from $MCD_DATA_DIR, because the
GPT-2 files and OpenWebText are not available offline:

  MCD_DATA_DIR=../shared/data python -m mcd_jax.main \
      --config configs/owt_gpt2_small.py:smoke --workdir /tmp/owt_smoke

Expected result: not measured yet (it needs accelerators); docs/scaling.md
lists its memory per device.
"""

from mcd_jax import config_base


def get_config(arg=None):
  config = config_base.base_config()
  config.task = 'diffusion'
  config.data.source = 'tfds'
  config.data.tfds_name = 'openwebtext'
  config.data.tokenizer = 'gpt2'
  config.data.seq_len = 1024
  config.data.batch_size = 512
  config.model.d_model = 768
  config.model.num_layers = 12
  config.model.num_heads = 12
  config.model.mlp_dim = 3072
  config.model.dtype = 'bfloat16'
  config.model.dropout_rate = 0.1
  config.optim.learning_rate = 3e-4
  config.optim.warmup_steps = 2500
  config.optim.b2 = 0.999
  config.optim.ema_rate = 0.9999
  config.train.num_steps = 1_000_000
  config.train.log_every = 100
  config.train.eval_every = 10_000
  config.train.eval_batches = 64
  config.train.checkpoint_every = 5000
  config.sampling.num_steps = 1024
  config.mesh.shape = (-1, 1, 1)
  if config_base.parse_smoke_argument(arg):
    config.data.source = 'files'
    config.data.paths = 'tinyshakespeare/input.txt'
    config.data.tfds_name = ''
    config.data.tokenizer = 'sentencepiece'
    config.data.vocab_size = 512
    config.model.dtype = 'float32'
    config.model.dropout_rate = 0.0
    config_base.apply_smoke(config)
  return config
