"""The demo: DeepLabv3+ with a tiny ResNet on the embedded synthetic_shapes dataset.

  python -m pseudoseg_jax.main --config=configs/demo.py --workdir=workdirs/demo

Arguments after the colon, comma-separated: method=supervised (default, for now the only method),
num_labeled=N (labeled images taken from the 2,000-image train pool; default 100), steps=N.
Hardware: a laptop CPU (2 cores); the dataset is generated locally on first use.
Time and result: see README.md (measured there with this exact command).
"""

from pseudoseg_jax import config as config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_args(arg, known=("method", "num_labeled", "steps"), source="demo.py")
  config = config_lib.base_config()
  config.method = args.get("method", "supervised")
  config.total_steps = int(args.get("steps", 2_000))
  config.batch_size = 16
  config.eval_batch_size = 50
  config.crop_size = 97  # DeepLab's 4k+1 sizes: 97 -> 25x25 logits align exactly.
  config.eval_crop_size = 97

  config.data.name = "synthetic_shapes"
  config.data.num_labeled = int(args.get("num_labeled", 100))
  config.data.num_classes = 8  # synthetic_shapes: background + 7 shapes.
  config.data.shuffle_buffer = 512

  config.model.backbone = "resnet_tiny"
  config.model.aspp_channels = 64
  config.model.decoder_channels = 64
  config.model.low_level_channels = 24

  config.optimizer.learning_rate = 0.02
  config.log_every = 100
  config.eval_every = 1_000
  config.checkpoint_every = 500
  return config
