"""megafusion: LlamaFusion (LMFusion) pretraining on megatron-core, DeepSpeed, Ray and SLURM."""

from setuptools import find_packages, setup

# Versions that install together on Python 3.11 (see README "Installation").
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "megatron-core==0.16.1",
    "deepspeed==0.19.8",
    "transformers==5.23.0",
    "diffusers==0.42.1",
    "webdataset==1.0.2",
    "ray[default]==2.60.0",
    "safetensors==0.8.0",
    "xxhash==4.1.0",  # checkpoint checksums (XXH3-128)
    "pyyaml>=6.0",
    "psutil>=5.9",
    "numpy>=1.26",
    "tqdm>=4.66",
    "tensorboard>=2.16",
    "matplotlib==3.11.2",  # report loss curves (issue 22)
    "pyarrow==26.0.1",  # parquet inputs of tools/precompute_latents.py
    "torchmetrics==1.9.0",  # FID statistics, CLIP score (megafusion/metrics)
    "pycocoevalcap==1.2",  # CIDEr, BLEU-4, ROUGE-L, METEOR (Java) of captions
]

setup(
    name="megafusion",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["megafusion", "megafusion.*", "launcher", "launcher.*"]),
    package_data={"megafusion.config": ["presets/*.yaml"], "megafusion": ["assets/shapes_vae/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest==9.0.3", "pytest-timeout==2.4.0", "ruff==0.17.5", "import-linter==2.16"]},
)
