"""cdft: Collaborative Distillation and Factor Transfer in JAX/Flax."""
import setuptools

# oneDNN from PyPI: the library and its headers (Linux x86-64 wheels only).
ONEDNN = "onednn"
ONEDNN_PIN = "==2023.2.0; platform_system == 'Linux' and platform_machine == 'x86_64'"

setuptools.setup(
    name="cdft",
    version="0.1.0",
    description=(
        "Collaborative Distillation (ultra-resolution universal style transfer) "
        "and Factor Transfer in JAX/Flax."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["cdft", "cdft.*"]),
    # Built on first use by cdft.kernels.build (a C++ compiler and the onednn extra).
    package_data={"cdft.kernels": ["*.cc"]},
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "ml-collections",
        "absl-py",
        "numpy",
        "pillow",
        "psutil",
        "flatbuffers",  # jax.export serialization (the stored stylization programs)
        # ml_dtypes 0.7.0's extension takes 0.8-1.3 s to import (0.6.0: 0.01 s), and
        # jax imports it in every process: `import jax` 2.0 s vs 1.06 s on 2 cores.
        "ml_dtypes>=0.5,<0.7",
    ],
    extras_require={
        # oneDNN's library and headers: CPU training runs its convolutions on oneDNN
        # (cdft.kernels, config.cpu_conv), 2-3x faster than XLA:CPU's for the CIFAR ResNets.
        "onednn": [ONEDNN + "-cpu-gomp" + ONEDNN_PIN, ONEDNN + "-devel-cpu-gomp" + ONEDNN_PIN],
        # Training data: TFDS data sources without TensorFlow, read by grain (worker
        # processes), and the digits dataset of the FT checks.
        "data": ["tensorflow-datasets", "array-record", "grain", "scikit-learn"],
        # Loss curves (launch/plot_metrics.py, cdft.training.plots).
        "plots": ["matplotlib"],
        # pytest-xdist: the README's test command runs 2 worker processes.
        "test": ["pytest", "pytest-xdist", "nbformat", "nbclient", "ipykernel",
                 "tensorflow-datasets", "array-record", "grain", "scikit-learn", "matplotlib",
                 ONEDNN + "-cpu-gomp" + ONEDNN_PIN, ONEDNN + "-devel-cpu-gomp" + ONEDNN_PIN],
    },
    entry_points={
        "console_scripts": [
            "cdft-stylize=cdft.stylize.cli:entry",
            "cdft-weights=cdft.weights.cli:main",
        ],
    },
)
