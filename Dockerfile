# tcompose on a CUDA GPU box:
#   docker build -t tcompose .
#   docker run --gpus all -v ~/.cache/huggingface:/root/.cache/huggingface -v $PWD/data:/data \
#       tcompose multigen --prompts 50 --images 5 --model sd14=CompVis/stable-diffusion-v1-4 --output /data/multigen
# The base is the official PyTorch CUDA runtime image of the torch version constraints.txt pins, so pip keeps
# its CUDA torch; pass --build-arg BASE=... for another CUDA version of the same torch.
ARG BASE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/root/.cache/huggingface

WORKDIR /opt/tcompose

# Dependencies first (cached layer): the package metadata and the pins, then the code.
COPY pyproject.toml constraints.txt README.md ./
COPY tcompose ./tcompose
# constraints.txt pins torch to the base image's version, so pip never replaces the CUDA build. torchvision is
# removed: tcompose does not use it, and without it transformers takes the same image-processing path as the
# tested CPU build.
RUN pip install -c constraints.txt . \
    && (pip uninstall -y torchvision torchaudio || true) \
    && python -c "import torch, tcompose; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Model weights live in the mounted Hugging Face cache; `tcompose download ...` fills it, then runs can set
# HF_HUB_OFFLINE=1.
VOLUME ["/root/.cache/huggingface", "/data"]
WORKDIR /data
ENTRYPOINT ["tcompose"]
CMD ["--help"]
