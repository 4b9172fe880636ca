"""What every converter shares: the weights type and the renaming of a file's tensors."""

from __future__ import annotations

from typing import Mapping

import numpy as np

BackboneWeights = dict  # str -> np.ndarray


def renamed_tensors(state_dict: Mapping, is_dropped, convert_tensor, *, source: str) -> dict:
  """Our name -> array for every file tensor `is_dropped` keeps, via convert_tensor(name, array)."""
  weights = {}
  for file_name, array in state_dict.items():
    if is_dropped(file_name):
      continue
    name, value = convert_tensor(file_name, np.asarray(array))
    if name in weights:  # Two file tensors for one of ours: never pick one silently.
      raise ValueError(f"{source}: {file_name} and another tensor both map to {name}.")
    weights[name] = value
  return weights
