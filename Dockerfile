# relora_dist image for cluster jobs (docs/cluster.md).
#
#   GPU (default base: CUDA 12.8 + PyTorch 2.7.1, devel, so DeepSpeed can compile ops):
#     docker build -t relora_dist .
#   CPU (small; the CPU torch wheel from PyTorch's CPU index):
#     docker build --build-arg BASE=python:3.11-slim -t relora_dist:cpu .
#
#   docker run --gpus all --ipc=host -v "$PWD/runs:/opt/relora_dist/runs" relora_dist --train.max_steps=150
#
# The entry point is `relora-pretrain` (one process, the installed package); for several GPUs start
# the launcher with torchrun or deepspeed instead:
#   docker run --gpus all --ipc=host --entrypoint torchrun relora_dist --nproc_per_node 8 launchers/pretrain.py \
#     --config configs/60m_paper.yaml
ARG BASE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel
FROM ${BASE}

# Only used when the base has no torch (the CPU build): the same torch version as the GPU base.
ARG TORCH_VERSION=2.7.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG DEEPSPEED_VERSION=0.19.8
# GPU architectures compiled for when ops are prebuilt (there is no GPU at build time).
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
# DeepSpeed ops to prebuild in a CUDA image, e.g. "DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1". Default:
# none, because none is used: the trainer's optimizer is torch.optim.AdamW (a client optimizer, also
# under ZeRO offload: "zero_force_ds_cpu_optimizer": false) and ZeRO-2/3 collectives are torch's.
ARG DS_BUILD_CUDA_OPS=""

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# A C++ compiler for DeepSpeed's op builds: the devel CUDA base has one, python:*-slim does not.
# DL3008 (pin apt versions) is ignored: g++'s version is whatever the base's distribution release
# ships (BASE is a build argument), so no single pin fits every base.
# hadolint ignore=DL3008
RUN if ! command -v g++ >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends g++ \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# torch: keep the base image's build (CUDA); install the CPU wheel where the base has none.
RUN if python -c "import torch" 2>/dev/null; then \
        python -c "import torch; print('base torch', torch.__version__, 'cuda', torch.version.cuda)"; \
    else \
        python -m pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"; \
    fi

# DeepSpeed, built against that torch (--no-build-isolation: DeepSpeed's setup.py compiles ops with
# the installed torch). The CPU build prebuilds the one op a CPU run compiles: the shared-memory
# collective `deepspeed_shm_comm` (otherwise JIT-built, ~20 s, at the start of every job in a fresh
# container, into a writable home). CUDA builds prebuild DS_BUILD_CUDA_OPS (default none, see above).
RUN python -m pip install --no-cache-dir "setuptools==80.9.0" "wheel==0.45.1" "ninja==1.11.1.4" \
    && if python -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then \
        export DS_ACCELERATOR=cuda DS_BUILD_OPS=0; \
        for flag in ${DS_BUILD_CUDA_OPS}; do export "${flag?}"; done; \
    else \
        export DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1; \
    fi \
    && python -m pip install --no-cache-dir --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}" \
    && ds_report

# A non-root user owns the checkout, so runs/ and .cache/ can be written next to it. Numeric ids
# (USER below) resolve on any host; pick others with --build-arg UID=... GID=... if 1000 is taken.
ARG UID=1000
ARG GID=1000
RUN groupadd --gid "${GID}" relora \
    && useradd --create-home --uid "${UID}" --gid "${GID}" --shell /bin/bash relora \
    && mkdir -p /opt/relora_dist \
    && chown "${UID}:${GID}" /opt/relora_dist
WORKDIR /opt/relora_dist

# The package, installed the way README and .ci/run install it: pip builds its wheel and installs
# that (not editable: the bundled corpus, tokenizer, presets and DeepSpeed templates are package
# data, so relora-pretrain runs from any directory), with the test extra so `python -m pytest` can
# check an image; dependencies first, for layer caching. "./[test]" is pip's ".[test]" written as a
# path, which hadolint's DL3013 (pin versions) recognizes as local. The check runs isolated (-I: the
# working directory is not on sys.path), so it imports the installed copy and finds its bundled files.
COPY --chown=${UID}:${GID} pyproject.toml README.md ./
COPY --chown=${UID}:${GID} relora_dist/ relora_dist/
RUN python -m pip install --no-cache-dir "./[test]" \
    && rm -rf build relora_dist.egg-info \
    && python -I -c "import os, deepspeed, relora_dist.cli, relora_dist.resources as r; assert os.path.isfile(r.CORPUS)"
# The checkout beside it: launchers/pretrain.py for torchrun/deepspeed, tools/, tests/.
COPY --chown=${UID}:${GID} . .

USER ${UID}:${GID}
ENV HOME=/home/relora
ENTRYPOINT ["relora-pretrain"]
