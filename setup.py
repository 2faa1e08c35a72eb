"""Packaging for legrad (distribution name ``legrad_torch``)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "legrad" / "__init__.py").read_text()).group(1)

setup(
    name="legrad_torch",
    version=VERSION,
    description="LeGrad: explainability heatmaps for vision-language Vision Transformers (OpenCLIP)",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["legrad", "legrad.*"]),
    include_package_data=True,
    package_data={"legrad": ["assets/*", "assets/**/*"]},
    install_requires=[
        "torch>=2.1,<3",
        "torchvision>=0.16,<1",
        "open_clip_torch>=2.24,<4",
        "numpy>=1.23",
        "pillow>=9",
        "matplotlib>=3.6",
        "opencv-python>=4.7",
        "tqdm>=4.60",
    ],
    extras_require={
        "dev": ["pytest>=7", "ruff>=0.5", "timm>=0.9", "torchcam>=0.5,<0.6"],  # torchcam: reference in tests only
        "hf": ["transformers>=4.50,<6"],
        "app": ["gradio>=5,<7"],
        "e2e": ["playwright>=1.40,<2"],
    },
    entry_points={"console_scripts": ["legrad=legrad.cli:main"]},
)
