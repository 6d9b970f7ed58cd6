"""Installs the packages hfsoftmax, paramserver and evaluation (see README.md)."""
from setuptools import find_packages, setup

setup(
    name="hfsoftmax",
    version="0.1.0",
    description="HF-Softmax: training classifiers with millions of classes via dynamic class "
                "selection over a ZeroMQ parameter server",
    python_requires=">=3.10",
    packages=find_packages(include=["hfsoftmax", "hfsoftmax.*", "paramserver", "paramserver.*",
                                    "evaluation", "evaluation.*"]),
    package_data={"paramserver": ["PROTOCOL.md"]},
    install_requires=["numpy", "pyzmq", "psutil"],
    extras_require={
        "train": ["torch", "torchvision", "annoy", "hnswlib", "faiss-cpu", "pillow", "tqdm",
                  "tensorboard", "pyyaml"],
        "eval": ["scikit-learn", "scipy", "matplotlib"],
        "export": ["onnx", "onnxruntime"],
    },
    entry_points={"console_scripts": [
        "hfsoftmax-paramserver=paramserver.paramserver:main",
        "hfsoftmax-train=hfsoftmax.train:main",
        "hfsoftmax-eval=hfsoftmax.eval:main",
        "hfsoftmax-extract=hfsoftmax.extract:main",
        "hfsoftmax-export=hfsoftmax.export:main",
        "hfsoftmax-eval-ijb=hfsoftmax.eval_ijb:main",
    ]},
)
