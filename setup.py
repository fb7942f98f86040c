"""minicaffe: a Caffe-compatible deep learning engine in Python (NumPy on CPU, CuPy on GPU)."""
from setuptools import find_packages, setup

setup(
    name="minicaffe",
    version="0.1.0",
    description="Caffe-compatible deep learning engine: prototxt, caffemodel, LMDB, pycaffe API, in Python",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["minicaffe", "minicaffe.*"]),
    package_data={"minicaffe": ["proto/*.py"]},
    install_requires=[
        "numpy>=1.23",
        # the committed caffe_pb2.py is protoc 35.1 gencode, which needs runtime >= 7.35.1
        "protobuf>=7.35.1,<8",
        "lmdb>=1.4",
        "opencv-python-headless>=4.8",
        # the progress bars of train/test/time (ETA, s/iter when slow, log lines clear and redraw it)
        "tqdm>=4.66",
    ],
    extras_require={
        # [ctk] pulls the CUDA libraries CuPy loads (cuBLAS, NVRTC, cuRAND...) from PyPI, so a machine
        # with only the NVIDIA driver works; plain cupy-cudaXXx expects a CUDA Toolkit installed
        "gpu": ["cupy-cuda12x[ctk]>=14"],
        "gpu-cuda13": ["cupy-cuda13x[ctk]>=14"],
        "hdf5": ["h5py>=3.8"],
        "draw": ["pydot>=2"],
        "plot": ["matplotlib>=3.7"],
        "mpi": ["mpi4py>=3.1"],          # plus an MPI library: apt-get install openmpi-bin libopenmpi-dev
        # LevelDB (Caffe's default data_param.backend): plyvel's manylinux wheels bundle libleveldb+snappy
        "leveldb": ["plyvel>=1.5"],
        "tensorboard": ["tensorboardX>=2.6"],   # minicaffe train --tensorboard DIR
        "test": ["pytest>=7", "hypothesis>=6", "h5py>=3.8", "pydot>=2", "grpcio-tools>=1.85",
                 "scikit-learn>=1.3", "matplotlib>=3.7", "mpi4py>=3.1", "plyvel>=1.5", "tensorboardX>=2.6"],
        "examples": ["scikit-learn>=1.3"],
        "bench": ["torch==2.13.0", "opencv-python-headless==4.12.0.88"],
    },
    entry_points={
        "console_scripts": [
            "minicaffe=minicaffe.tools.cli:main",
            "convert_imageset=minicaffe.tools.convert_imageset:main",
            "compute_image_mean=minicaffe.tools.compute_image_mean:main",
            "upgrade_net_proto_text=minicaffe.tools.upgrade:main_net_text",
            "upgrade_net_proto_binary=minicaffe.tools.upgrade:main_net_binary",
            "upgrade_solver_proto_text=minicaffe.tools.upgrade:main_solver_text",
            "extract_features=minicaffe.tools.extract_features:main",
            "draw_net=minicaffe.tools.draw_net:main",
            "parse_log=minicaffe.tools.parse_log:main",
            "plot_training_log=minicaffe.tools.plot_training_log:main",
            "classify=minicaffe.tools.classify:main",
            "visualize=minicaffe.tools.visualize:main",
            "convert_mnist_data=minicaffe.tools.convert_mnist_data:main",
            "convert_cifar_data=minicaffe.tools.convert_cifar_data:main",
        ],
    },
)
