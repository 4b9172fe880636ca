"""Convert pretrained backbone weights once into an .npz the trainer loads (model.init_from).

  python -m pseudoseg_jax.convert --config=configs/voc_pseudoseg.py --input=resnet101.safetensors \
      --output=weights/resnet101.npz

The config says which backbone the weights are for (model.backbone, model.deep_stem,
model.resnet_variant); its other fields do not matter here. Every tensor of the file must map onto
that backbone and every backbone tensor must be in the file, or nothing is written and the
offending names are listed. An existing --output (a link included, dangling or not) is never
replaced without --overwrite, and with it the file is replaced, never written through.
"""

import os

from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from pseudoseg_jax import convert
from pseudoseg_jax.models import build_model


def define_flags() -> None:
  """Only when run as a program: main.py, predict.py and evaluate.py define flags of the same
  names, and tests import every module into one process."""
  config_flags.DEFINE_config_file("config", None, "The training config (its model section).")
  flags.DEFINE_string("input", None, "Weights file: .safetensors, .pth, .h5, TF checkpoint.")
  flags.DEFINE_string("output", None, "The .npz to write.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")
  flags.mark_flags_as_required(["config", "input", "output"])


def backbone_shapes(config) -> dict:
  """Name -> shape of the config's backbone tensors, without allocating the model."""
  abstract = nnx.eval_shape(lambda: build_model(config.model, config.data.num_classes,
                                                rngs=nnx.Rngs(0)))
  _, params, batch_stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
  return convert.expected_shapes(nnx.to_pure_dict(params)["backbone"],
                                 nnx.to_pure_dict(batch_stats)["backbone"])


def convert_file(config, input_path: str, output_path: str, *, overwrite: bool = False) -> int:
  """Writes the checked .npz; returns the number of tensors. Raises ValueError on any mismatch."""
  if not output_path.endswith(convert.NPZ_SUFFIX):
    raise ValueError(f"--output={output_path!r} must end in {convert.NPZ_SUFFIX}.")
  if os.path.isdir(output_path):
    raise ValueError(f"--output={output_path} is a folder; name the .npz file to write.")
  # lexists: a dangling link counts too, so --overwrite is the only way anything is replaced.
  if os.path.lexists(output_path) and not overwrite:
    raise ValueError(f"--output={output_path} exists; pass --overwrite to replace it.")
  weights = convert.read_weights(input_path, config.model)
  errors = convert.mapping_errors(weights, backbone_shapes(config))
  if errors:
    raise ValueError(f"{input_path} does not match the {config.model.backbone} backbone of the "
                     f"config; nothing was written:\n  " + "\n  ".join(errors))
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  try:
    convert.save_npz(output_path, weights, overwrite=overwrite)
  except FileExistsError as error:  # Appeared while converting: still never replaced.
    raise ValueError(f"--output={output_path} exists; pass --overwrite to replace it.") from error
  return len(weights)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  values = flags.FLAGS
  try:
    count = convert_file(values.config, values.input, values.output, overwrite=values.overwrite)
  except (ValueError, FileNotFoundError) as error:
    raise SystemExit(f"error: {error}") from error  # The message is the whole story: no trace.
  print(f"Wrote {count} backbone tensors to {values.output}; train with "
        f"--config.model.init_from={values.output}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
