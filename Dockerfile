# The moe-train GPU image: what Kubernetes pods run (components.py:deepseek_v2_full --image ...),
# and what Slurm sites can import with enroot/apptainer.  Build from the repository root:
#   docker build -t REGISTRY/moe-train:TAG .
# The base's CUDA PyTorch is the minor version CI tests on CPU (2.13) and has the public
# torch.nn.functional.grouped_mm (torch >= 2.10) the shard experts run on; CUDA 12.6 runs on any
# driver >= 560 and covers sm_80 (A100) and sm_90 (H100/H200).  pyproject's torch range contains
# it, so pip keeps it.  devel, not runtime: nvcc builds flash-attn and DeepSpeed's JIT ops.
FROM pytorch/pytorch:2.13.0-cuda12.6-cudnn9-devel

# PIP_BREAK_SYSTEM_PACKAGES: harmless on a conda base, needed where the base's Python is the
# system one (PEP 668).
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1

# flash-attn first, in its own layer: the slowest step.  No prebuilt wheel exists for torch 2.13,
# so it compiles (about 30 min at MAX_JOBS=8), for A100 and H100/H200 only.  Its version
# satisfies the `gpu` extra.  Without it the model takes torch's own varlen attention on CUDA.
RUN pip install --no-cache-dir ninja==1.13.2 packaging==26.3 psutil==7.2.2 einops==0.8.2 \
    && MAX_JOBS=8 FLASH_ATTN_CUDA_ARCHS="80;90" \
       pip install --no-cache-dir --no-build-isolation flash-attn==2.8.3.post2

# The libraries the code works around by version, pinned here and ranged in pyproject.
RUN pip install --no-cache-dir deepspeed==0.19.8 transformers==5.24.0 tensorboard==2.21.0 \
    datasets==5.2.0 fsspec==2026.9.0 s3fs==2026.9.0 gcsfs==2026.8.2

WORKDIR /opt/moe-train
COPY . .
# The package with every runtime extra (not dev), then an unprivileged user to train as; its HOME
# holds the caches (Hugging Face, the torch extensions DeepSpeed builds).
RUN pip install --no-cache-dir "/opt/moe-train[gpu,s3,gcs,report,mlflow,wandb,lora]" \
    && useradd --create-home --uid 1000 --user-group --shell /bin/bash moe
USER 1000:1000
WORKDIR /home/moe

ENTRYPOINT ["moe-train"]
CMD ["--help"]
