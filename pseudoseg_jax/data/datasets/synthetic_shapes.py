"""Synthetic shapes: a generated semantic-segmentation dataset that needs no download.

Seven foreground classes told apart by shape, helped (not decided) by texture, never by colour: every
object's two colours are drawn independently of its class. Backgrounds are smooth colour fields with
gradients, sometimes a faint texture, a lumpy textured decoy and small clutter (all background class).
The 'colour_cue' config makes colour a cue too, as in real scenes: each object wears two shades of a
hue drawn around its class's own (neighbouring classes' hues overlap) on greyish backgrounds.
Objects span 22-64 px, rotate, and occlude each other; masks carry an ignore band (255) over every
object border, like VOC's void band. Each example depends only on (split, index), so generation order
and parallelism don't matter.

    from pseudoseg_jax.data.datasets import synthetic_shapes
    synthetic_shapes.SyntheticShapes(data_dir=DIR).download_and_prepare()   # ~2,300 images
    ds = tfds.load('synthetic_shapes', data_dir=DIR, split='train[:100]')
"""

from __future__ import annotations

import colorsys
import dataclasses
from typing import Callable, Iterator, NamedTuple

import numpy as np
import tensorflow_datasets as tfds

CLASS_NAMES = ("background", "disc", "square", "triangle", "ring", "cross", "star", "ellipse")
NUM_CLASSES = len(CLASS_NAMES)
IGNORE_LABEL = 255
IMAGE_SIZE = 96

BASE_SEED = 20210126
SPLIT_SEED_INDEX = {"train": 0, "validation": 1}

# Diameter of the circumscribed circle, pixels. 1.0.0 drew 12-60 px with decoys in half the images:
# the demo's from-scratch tiny model then learned nothing but background within its CPU budget.
MIN_OBJECT_SIZE, MAX_OBJECT_SIZE = 22.0, 64.0
MAX_OBJECTS = 4
MAX_PLACEMENT_TRIES = 30
# Pixels this close (Chebyshev distance) to a change of object id become IGNORE_LABEL: 2 px wide band.
BAND_RADIUS = 1
# Every object keeps this many pixels outside the band, and at least half of what it had when placed,
# so a reported object is really visible and "1-4 objects" holds in the mask too.
MIN_CORE_PIXELS = 20
MIN_VISIBLE_FRACTION = 0.5
# How often an object wears its class's own texture family; otherwise any family, so texture is a cue
# a model can use but cannot rely on alone.
PRIMARY_TEXTURE_PROBABILITY = 0.8
# How often the background holds an object-sized textured blob of no class's shape.
DECOY_PROBABILITY = 0.2
# Least RGB distance between an object's mean colour and what it covers.
MIN_OBJECT_CONTRAST = 60.0
# colour_cue: spread (standard deviation, in turns) of an object's hue around its class's. Classes sit
# 1/7 of a turn apart, so about 70% of objects are nearer their own class's hue than another's.
HUE_SPREAD = 25 / 360
# colour_cue: background colours keep at most this fraction of their distance from grey; objects are
# at least 45% saturated.
BACKGROUND_SATURATION = 0.3

_Y, _X = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)


class Scene(NamedTuple):
  image: np.ndarray  # uint8 [96, 96, 3]
  mask: np.ndarray  # uint8 [96, 96]: 0 background, 1..7 classes, 255 ignore band
  object_classes: tuple[int, ...]  # class of each drawn object, back to front


# ---------------------------------------------------------------- signed distances (negative inside)
def _sd_disc(x, y, radius):
  return np.hypot(x, y) - radius


def _sd_box(x, y, half_width, half_height):
  qx, qy = np.abs(x) - half_width, np.abs(y) - half_height
  return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def _sd_triangle(x, y, half_side):
  """Equilateral triangle centred on its circumcentre (Inigo Quilez's formulation)."""
  k = np.sqrt(3.0)
  x = np.abs(x) - half_side
  y = y + half_side / k
  fold = x + k * y > 0
  x, y = np.where(fold, (x - k * y) / 2, x), np.where(fold, (-k * x - y) / 2, y)
  x = x - np.clip(x, -2 * half_side, 0)
  return -np.hypot(x, y) * np.sign(y)


def _sd_star(x, y, radius, points, sharpness):
  """Regular star; sharpness in [2, points], 2 being a plain polygon (Inigo Quilez's formulation)."""
  half_sector, inner_angle = np.pi / points, np.pi / sharpness
  sector = np.mod(np.arctan2(x, y), 2 * half_sector) - half_sector
  r = np.hypot(x, y)
  px = r * np.cos(sector) - radius * np.cos(half_sector)
  py = r * np.abs(np.sin(sector)) - radius * np.sin(half_sector)
  ex, ey = np.cos(inner_angle), np.sin(inner_angle)
  t = np.clip(-(px * ex + py * ey), 0, radius * np.sin(half_sector) / ey)
  px, py = px + ex * t, py + ey * t
  return np.hypot(px, py) * np.sign(px)


def _sd_ellipse(x, y, semi_major, semi_minor):
  """First-order distance (implicit value over gradient norm): exact enough for a 1 px edge ramp."""
  qx, qy = x / semi_major, y / semi_minor
  q = np.hypot(qx, qy) + 1e-6
  gradient_norm = np.hypot(qx / semi_major, qy / semi_minor) / q
  return (q - 1) / np.maximum(gradient_norm, 1e-6)


def _shape_distance(rng, class_name, x, y, radius):
  """Signed distance to one class's shape inside a circle of `radius`; proportions vary per object."""
  if class_name == "disc":
    return _sd_disc(x, y, radius)
  if class_name == "square":
    return _sd_box(x, y, radius / np.sqrt(2), radius / np.sqrt(2))
  if class_name == "triangle":
    return _sd_triangle(x, y, radius * np.sqrt(3) / 2)
  if class_name == "ring":
    # A thinner ring would vanish under the 2 px ignore band at the small end of the size range.
    thickness = max(4.0, radius * rng.uniform(0.3, 0.5))
    return np.abs(np.hypot(x, y) - (radius - thickness / 2)) - thickness / 2
  if class_name == "cross":
    arm_ratio = rng.uniform(0.22, 0.35)
    arm_length = radius / np.hypot(1, arm_ratio)
    arm_width = max(2.5, arm_length * arm_ratio)
    return np.minimum(_sd_box(x, y, arm_length, arm_width), _sd_box(x, y, arm_width, arm_length))
  if class_name == "star":
    return _sd_star(x, y, radius, int(rng.integers(5, 7)), rng.uniform(2.6, 3.6))
  if class_name == "ellipse":
    # Elongated enough that a rotated ellipse is never mistaken for a disc.
    return _sd_ellipse(x, y, radius, max(3.5, radius / rng.uniform(1.8, 3.2)))
  raise ValueError(f"no shape for class {class_name!r}")


# ---------------------------------------------------------------- textures: t in [0, 1] blends 2 colours
def _value_noise(rng, period, x=_X, y=_Y):
  """Smooth random field with blobs about `period` pixels across (bilinear lattice, smoothstep)."""
  gx, gy = x / period + rng.uniform(0, 1), y / period + rng.uniform(0, 1)
  gx, gy = gx - gx.min(), gy - gy.min()
  lattice = rng.random((int(gy.max()) + 2, int(gx.max()) + 2)).astype(np.float32)
  ix, iy = gx.astype(np.int32), gy.astype(np.int32)
  fx, fy = gx - ix, gy - iy
  fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
  top = lattice[iy, ix] * (1 - fx) + lattice[iy, ix + 1] * fx
  bottom = lattice[iy + 1, ix] * (1 - fx) + lattice[iy + 1, ix + 1] * fx
  return top * (1 - fy) + bottom * fy


def _square_wave(phase, sharpness):
  return 0.5 + 0.5 * np.tanh(sharpness * np.sin(phase))


def _stripes(rng, u, v, period):
  angle = rng.uniform(0, np.pi)
  w = u * np.cos(angle) + v * np.sin(angle)
  return _square_wave(2 * np.pi * w / period + rng.uniform(0, 2 * np.pi), rng.uniform(1.5, 4))


def _checker(rng, u, v, period):
  a = np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
  b = np.sin(2 * np.pi * v / period + rng.uniform(0, 2 * np.pi))
  return 0.5 + 0.5 * np.tanh(rng.uniform(3, 8) * a * b)


def _dots(rng, u, v, period):
  du = np.mod(u / period + rng.uniform(0, 1), 1) - 0.5
  dv = np.mod(v / period + rng.uniform(0, 1), 1) - 0.5
  dot_radius = period * rng.uniform(0.2, 0.35)
  return np.clip(dot_radius - np.hypot(du, dv) * period + 0.5, 0, 1)


def _concentric(rng, u, v, period):
  d = np.hypot(u - rng.uniform(-2, 2), v - rng.uniform(-2, 2))
  return _square_wave(2 * np.pi * d / period + rng.uniform(0, 2 * np.pi), rng.uniform(1.5, 4))


def _solid(rng, u, v, period):
  return 0.3 * _value_noise(rng, period, u, v)


def _blobs(rng, u, v, period):
  return 1 / (1 + np.exp(-10 * (_value_noise(rng, period, u, v) - 0.5)))


_TEXTURES: tuple[Callable, ...] = (_stripes, _checker, _dots, _concentric, _solid, _blobs)
# Each class's own texture family and period range in pixels. Triangle and star share stripes at
# different frequencies, so frequency matters and the ranges overlap a little.
_PRIMARY_TEXTURES = {
    "disc": (_concentric, (4.0, 8.0)),
    "square": (_checker, (5.0, 10.0)),
    "triangle": (_stripes, (3.0, 5.5)),
    "ring": (_solid, (8.0, 16.0)),
    "cross": (_dots, (5.0, 8.0)),
    "star": (_stripes, (5.0, 10.0)),
    "ellipse": (_blobs, (6.0, 12.0)),
}


def _random_colour_pair(rng, min_contrast, max_contrast, backdrop=None):
  """Two colours min..max_contrast apart; given a backdrop colour, their mean stands out from it.

  Rejecting camouflaged objects (regardless of class) keeps every labelled object visible.
  """
  for _ in range(20):
    first = rng.uniform(0, 255, 3)
    direction = rng.normal(size=3)
    offset = direction / np.linalg.norm(direction) * rng.uniform(min_contrast, max_contrast)
    second = np.clip(first + offset, 0, 255)
    if backdrop is None or np.linalg.norm((first + second) / 2 - backdrop) >= MIN_OBJECT_CONTRAST:
      break
  return first.astype(np.float32), second.astype(np.float32)


def _towards_grey(rng, colour):
  return colour.mean() + (colour - colour.mean()) * rng.uniform(0, BACKGROUND_SATURATION)


def _class_colour_pair(rng, class_id, backdrop):
  """colour_cue: a dark and a light shade (in random order) of one hue near the class's own (HSV hue
  (class_id - 1) / 7 of a turn, sd HUE_SPREAD), redrawn until it stands out from the backdrop."""
  for _ in range(20):
    hue = (class_id - 1) / (NUM_CLASSES - 1) + rng.normal(0, HUE_SPREAD)
    saturation = rng.uniform(0.45, 1.0)
    dark, light = sorted(rng.uniform(0.25, 1.0, 2))
    if light - dark < 0.25:  # Enough luminance contrast for the texture to show.
      light = min(1.0, dark + 0.25)
      dark = light - 0.25
    first = np.array(colorsys.hsv_to_rgb(hue % 1, saturation, dark)) * 255
    second = np.array(colorsys.hsv_to_rgb(hue % 1, saturation * rng.uniform(0.6, 1), light)) * 255
    if rng.random() < 0.5:
      first, second = second, first
    if np.linalg.norm((first + second) / 2 - backdrop) >= MIN_OBJECT_CONTRAST:
      break
  return first.astype(np.float32), second.astype(np.float32)


def _blend(colours, texture):
  first, second = colours
  return first * (1 - texture[..., None]) + second * texture[..., None]


def _paint(rng, texture_fn, u, v, period, min_contrast=40, max_contrast=140, backdrop=None,
           greyish=False):
  """Texture blended between two random colours (independent of any class), greyish ones for a
  colour_cue background."""
  colours = _random_colour_pair(rng, min_contrast, max_contrast, backdrop)
  if greyish:
    colours = tuple(_towards_grey(rng, colour).astype(np.float32) for colour in colours)
  return _blend(colours, texture_fn(rng, u, v, period))


def _object_texture(rng, class_id, u, v, backdrop, class_colours):
  if rng.random() < PRIMARY_TEXTURE_PROBABILITY:
    texture_fn, (low, high) = _PRIMARY_TEXTURES[CLASS_NAMES[class_id]]
  else:
    texture_fn, (low, high) = _TEXTURES[rng.integers(len(_TEXTURES))], (3.0, 12.0)
  if class_colours:
    colours = _class_colour_pair(rng, class_id, backdrop)
    return _blend(colours, texture_fn(rng, u, v, rng.uniform(low, high)))
  return _paint(rng, texture_fn, u, v, rng.uniform(low, high), backdrop=backdrop)


# ---------------------------------------------------------------- background
def _background(rng, greyish):
  field = _paint(rng, _blobs, _X, _Y, rng.uniform(16, 48), 30, 160, greyish=greyish)
  angle = rng.uniform(0, 2 * np.pi)
  ramp = (np.cos(angle) * _X + np.sin(angle) * _Y) / IMAGE_SIZE - 0.5
  image = field + (rng.uniform(-60, 60) * ramp)[..., None]
  if rng.random() < 0.35:
    # Objects' textures also appear in the background, so texture alone cannot segment.
    texture_fn = _TEXTURES[rng.integers(len(_TEXTURES))]
    overlay = _paint(rng, texture_fn, _X, _Y, rng.uniform(3, 12), greyish=greyish)
    opacity = rng.uniform(0.1, 0.3)
    image = image * (1 - opacity) + overlay * opacity
  if rng.random() < DECOY_PROBABILITY:
    _draw_decoy(rng, image, greyish)
  for _ in range(rng.integers(3, 13)):
    _draw_clutter(rng, image)
  return image


def _local_window(rng, reach):
  """A random centre's window (clipped to the image) and coordinates relative to that centre.

  Small things are drawn in their window only: a dozen full-image passes were half the render time.
  """
  cx, cy = rng.uniform(0, IMAGE_SIZE, 2)
  window = (slice(max(0, int(cy) - reach), int(cy) + reach + 1),
            slice(max(0, int(cx) - reach), int(cx) + reach + 1))
  return window, _X[window] - cx, _Y[window] - cy


def _draw_decoy(rng, image, greyish):
  """A textured, object-sized blob of no class's shape: background, so texture and size alone fail."""
  radius = rng.uniform(7, 20)
  window, x, y = _local_window(rng, int(1.45 * radius) + 2)
  # Lumpy on purpose: a smooth blob can pass for a disc or an ellipse, which would be label noise.
  wobble = _value_noise(rng, radius / 2.2, x, y)
  coverage = _edge_coverage(np.hypot(x, y) - radius * (0.35 + 1.1 * wobble))[..., None]
  texture_fn = _TEXTURES[rng.integers(len(_TEXTURES))]
  rgb = _paint(rng, texture_fn, x, y, rng.uniform(3, 12), greyish=greyish)
  image[window] = image[window] * (1 - coverage) + rgb * coverage


def _draw_clutter(rng, image):
  """One small background-class distractor (speck, short thin line, tiny square), all < 12 px."""
  window, x, y = _local_window(rng, 12)
  u, v = _rotate(x, y, rng.uniform(0, np.pi))
  kind = rng.integers(3)
  if kind == 0:
    distance = _sd_disc(u, v, rng.uniform(1.5, 3.5))
  elif kind == 1:
    distance = _sd_box(u, v, rng.uniform(3, 10), rng.uniform(0.5, 1.2))  # a line
  else:
    distance = _sd_box(u, v, rng.uniform(1.5, 3), rng.uniform(1.5, 3))
  coverage = _edge_coverage(distance)[..., None]
  colour = rng.uniform(0, 255, 3).astype(np.float32)
  image[window] = image[window] * (1 - coverage) + colour * coverage


# ---------------------------------------------------------------- objects and masks
def _rotate(x, y, angle):
  c, s = np.cos(angle), np.sin(angle)
  return c * x + s * y, -s * x + c * y


def _edge_coverage(signed_distance):
  """Fraction of the pixel inside the shape, as a 1 px linear ramp: cheap anti-aliasing."""
  return np.clip(0.5 - signed_distance, 0, 1)


def _object_frame(rng, radius, fallback):
  """Object-local coordinates for a random centre (the fallback's is the image centre) and rotation."""
  if fallback:
    cx = cy = IMAGE_SIZE / 2
  else:
    margin = 0.3 * radius  # allows objects cut by the frame, not mostly outside it
    cx, cy = rng.uniform(margin, IMAGE_SIZE - margin, 2)
  return _rotate(_X - cx, _Y - cy, rng.uniform(0, 2 * np.pi))


def _bounding_window(region):
  rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
  return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _border_band(instance_ids, radius=BAND_RADIUS):
  """Pixels within `radius` (Chebyshev) of a pixel with another id; the image frame is no border."""
  padded = np.pad(instance_ids, radius, mode="edge")
  band = np.zeros(instance_ids.shape, bool)
  for dy in range(2 * radius + 1):
    for dx in range(2 * radius + 1):
      band |= padded[dy:dy + IMAGE_SIZE, dx:dx + IMAGE_SIZE] != instance_ids
  return band


def _core_pixel_counts(instance_ids, soft_edge, num_objects):
  visible = (instance_ids >= 0) & ~_border_band(instance_ids) & ~soft_edge
  return np.bincount(instance_ids[visible], minlength=num_objects)


class _Placement(NamedTuple):
  coverage: np.ndarray  # float [96, 96] anti-aliased coverage of the new object
  instance_ids: np.ndarray  # int [96, 96], -1 background, objects by draw order
  soft_edge: np.ndarray  # bool [96, 96], anti-aliased pixels still on top
  core_pixels: int  # the new object's pixels outside the band
  u: np.ndarray  # object-local coordinates, for its texture
  v: np.ndarray


def _place_object(rng, class_id, instance_ids, soft_edge, placed_core_pixels) -> _Placement | None:
  """Random size/position/rotation such that every object keeps enough visible core pixels.

  The very first object falls back to a centred mid-size one, so an image never ends up empty; later
  objects that find no room are dropped rather than forced over the others.
  """
  index = len(placed_core_pixels)
  needed = np.maximum(MIN_CORE_PIXELS, MIN_VISIBLE_FRACTION * np.array(placed_core_pixels + [0]))
  for attempt in range(MAX_PLACEMENT_TRIES + (index == 0)):
    fallback = attempt == MAX_PLACEMENT_TRIES
    radius = 15.0 if fallback else rng.uniform(MIN_OBJECT_SIZE, MAX_OBJECT_SIZE) / 2
    u, v = _object_frame(rng, radius, fallback)
    coverage = _edge_coverage(_shape_distance(rng, CLASS_NAMES[class_id], u, v, radius))
    inside = coverage >= 0.5
    new_ids = np.where(inside, index, instance_ids)
    new_soft_edge = (soft_edge & ~inside) | ((coverage > 0.05) & (coverage < 0.95))
    counts = _core_pixel_counts(new_ids, new_soft_edge, index + 1)
    if np.all(counts >= needed):
      return _Placement(coverage, new_ids, new_soft_edge, int(counts[index]), u, v)
  return None


def render_scene(rng: np.random.Generator, class_colours: bool = False) -> Scene:
  """Background, then 1-4 objects back to front, each textured in its own random colours (with
  `class_colours`, the 'colour_cue' config: shades of its class's hue on a greyish background)."""
  image = _background(rng, greyish=class_colours)
  instance_ids = np.full((IMAGE_SIZE, IMAGE_SIZE), -1, np.int32)
  soft_edge = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
  object_classes, placed_core_pixels = [], []
  for _ in range(rng.integers(1, MAX_OBJECTS + 1)):
    class_id = int(rng.integers(1, NUM_CLASSES))
    placement = _place_object(rng, class_id, instance_ids, soft_edge, placed_core_pixels)
    if placement is None:
      continue
    window = _bounding_window(placement.coverage > 0)  # texturing only there halves render time
    alpha = placement.coverage[window][..., None]
    backdrop = image[window][alpha[..., 0] >= 0.5].mean(axis=0)
    rgb = _object_texture(rng, class_id, placement.u[window], placement.v[window], backdrop,
                          class_colours)
    image[window] = image[window] * (1 - alpha) + rgb * alpha
    instance_ids, soft_edge = placement.instance_ids, placement.soft_edge
    object_classes.append(class_id)
    placed_core_pixels.append(placement.core_pixels)

  image = image + rng.uniform(2, 8) * rng.standard_normal(image.shape, np.float32)  # sensor noise
  class_map = np.array([0] + object_classes)[instance_ids + 1]
  ignore = _border_band(instance_ids) | soft_edge
  mask = np.where(ignore, IGNORE_LABEL, class_map).astype(np.uint8)
  return Scene(np.clip(np.round(image), 0, 255).astype(np.uint8), mask, tuple(object_classes))


def example_rng(split: str, index: int) -> np.random.Generator:
  """The one source of randomness for an example: a function of (split, index) only."""
  return np.random.default_rng(np.random.SeedSequence([BASE_SEED, SPLIT_SEED_INDEX[split], index]))


def render_example(rng: np.random.Generator | np.random.SeedSequence,
                   class_colours: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(image uint8 [96, 96, 3], mask uint8 [96, 96]) for a Generator or SeedSequence."""
  scene = render_scene(np.random.default_rng(rng), class_colours)
  return scene.image, scene.mask


def image_labels_from_mask(mask: np.ndarray) -> np.ndarray:
  """Multi-hot uint8 [NUM_CLASSES - 1] of the foreground classes present (background, 255 excluded)."""
  present = np.bincount(mask.ravel(), minlength=IGNORE_LABEL + 1)[1:NUM_CLASSES] > 0
  return present.astype(np.uint8)


# ---------------------------------------------------------------- TFDS builder
@dataclasses.dataclass(eq=False)
class SyntheticShapesConfig(tfds.core.BuilderConfig):
  num_train: int = 2000
  num_validation: int = 300
  class_colours: bool = False  # colour_cue: objects in shades of their class's hue (module doc).


class SyntheticShapes(tfds.core.GeneratorBasedBuilder):
  """Generated shapes-and-textures segmentation (see module docstring); built locally in seconds."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.1.0": "Learnable within the CPU demo's budget: objects 22-64 px (was 12-60), own "
               "texture 80% of the time (was 70%), decoys in 20% of backgrounds (was 50%).",
      "1.0.0": "7 shape classes + background, random per-object colours, textured cluttered "
               "backgrounds, occlusion, 2 px ignore band; 96x96.",
  }
  BUILDER_CONFIGS = [
      SyntheticShapesConfig(name="default", description="2,000 train (pool) + 300 validation."),
      SyntheticShapesConfig(name="tiny", description="40 train + 20 validation, for tests.",
                            num_train=40, num_validation=20),
      SyntheticShapesConfig(name="colour_cue", class_colours=True,
                            description="As default, with colour a cue to the class, as in real "
                                        "scenes (module docstring)."),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__.split("\n\n    from")[0],
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
            "mask": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), encoding_format="png"),
            "image_labels": tfds.features.Tensor(shape=(NUM_CLASSES - 1,), dtype=np.uint8),
        }),
        # Written in index order, so 'train[:100]' is always train_000000..train_000099.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {
        "train": self._generate_examples("train", self.builder_config.num_train),
        "validation": self._generate_examples("validation", self.builder_config.num_validation),
    }

  def _generate_examples(self, split: str, num_examples: int) -> Iterator[tuple[str, dict]]:
    for index in range(num_examples):
      image, mask = render_example(example_rng(split, index), self.builder_config.class_colours)
      example_id = f"{split}_{index:06d}"
      yield example_id, {
          "id": example_id,
          "image": image,
          "mask": mask[..., None],
          "image_labels": image_labels_from_mask(mask),
      }
