"""rema_jax: ReMA (Reinforced Meta-thinking Agents) in JAX/Flax."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.4.30",
    "flax>=0.8.5",
    "optax>=0.2.3",
    "orbax-checkpoint>=0.6.0",
    "numpy>=1.26",
    "transformers>=4.45",
    "safetensors>=0.4",
    "tokenizers>=0.19",
    "jinja2>=3.1",  # chat templates (apply_chat_template)
    "gguf>=0.10",  # reading GGUF weights (the embedded default model)
    "huggingface_hub>=0.24",
    "tensorflow-datasets>=4.9",
    "math-verify>=0.7.0",
    "pebble>=5.0",  # killable worker processes for grading timeouts
    "ml_collections>=0.1.1",
    "absl-py>=2.0",
    "tqdm>=4.66",
    "rich>=13.0",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "pyarrow>=14",  # verl parquet task files
]

EXTRAS = {
    # Tests compare against the PyTorch reference implementation.
    # torch==2.13.0 is a CPU build already on the project's machines.
    "test": [
        "torch==2.13.0",
        "accelerate>=0.30",  # transformers' GGUF loading
        "pytest>=8.0",
        "pytest-xdist>=3.5",  # the README runs the suite on 2 workers (-n 2)
        "nbclient>=0.10",
        "nbformat>=5.10",
        "ipykernel>=6.29",
        "ruff==0.17.6",  # formatting and lint (pyproject.toml; .ci/run checks both); pinned: styles change
    ],
    # Accelerators: jax with its CUDA 12 or TPU runtime (benchmarks/gpu_suite.py measures what they do).
    "cuda": ["jax[cuda12]>=0.4.30"],
    "tpu": ["jax[tpu]>=0.4.30"],
}

setup(
    name="rema_jax",
    version="0.1.0",
    description="ReMA: multi-agent RL for meta-thinking LLMs, in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["rema_jax", "rema_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
