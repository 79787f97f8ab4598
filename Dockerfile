# usp_attn on a CUDA PyTorch image.
#
#   docker build -t usp-attn .
#   docker run --rm --gpus all usp-attn                       # prints `usp-attn info`
#   docker run --rm --gpus all usp-attn usp-attn info --shape 1,40,75600,128   # times the kernels
#   docker run --rm --gpus all --ipc=host usp-attn torchrun --nproc-per-node 8 -m usp_attn info
#
# With FlashAttention 2 (compiles against the image's torch; needs nvcc, i.e. a -devel image):
#   docker build -t usp-attn:flash \
#     --build-arg BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-devel --build-arg INSTALL_FLASH_ATTN=1 .
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# Extras from pyproject.toml to install with the package (comma-separated). fa4 = FlashAttention 4
# (pure-Python wheels, JIT-compiled on first use; use fa4-cu13 on a CUDA 13 base image).
ARG EXTRAS=fa4,sage,diffusers,video
# 1 = also build/install flash-attn (fa backend, FA2). Needs a -devel BASE_IMAGE.
ARG INSTALL_FLASH_ATTN=0
# Parallel compile jobs for flash-attn (each can take several GB of RAM).
ARG MAX_JOBS=4

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/usp_attn

# Keep the image's CUDA torch: every pip call below is constrained to exactly that version,
# so no dependency can replace it with another build.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /opt/torch-constraint.txt \
 && cat /opt/torch-constraint.txt
ENV PIP_CONSTRAINT=/opt/torch-constraint.txt

# flash-attn first (slow layer, cached independently of source changes). Its setup.py imports
# torch, hence --no-build-isolation; it downloads a matching prebuilt wheel when one exists and
# compiles otherwise.
RUN if [ "$INSTALL_FLASH_ATTN" = "1" ]; then \
        command -v nvcc >/dev/null || { echo "INSTALL_FLASH_ATTN=1 needs a -devel BASE_IMAGE (nvcc)" >&2; exit 1; }; \
        pip install packaging ninja && MAX_JOBS=${MAX_JOBS} pip install --no-build-isolation "flash-attn>=2.6"; \
    fi

COPY . .
RUN pip install ".[${EXTRAS}]" \
 && python -c "import torch, usp_attn; print('usp_attn', usp_attn.__version__, 'torch', torch.__version__)"

CMD ["usp-attn", "info"]
