# The moe-train GPU image: what Kubernetes pods run (components.py:deepseek_v2_full --image ...),
# and what Slurm sites can import with enroot/apptainer.  Build from the repository root:
#   docker build -t REGISTRY/moe-train:TAG .
# The base image's CUDA PyTorch satisfies pyproject's torch requirement, so pip keeps it.
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-devel

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# flash-attn first, in its own layer: the slowest step (a CUDA build when no prebuilt wheel
# matches), kept cached across code changes.  Its version satisfies the `gpu` extra.
RUN pip install --no-cache-dir ninja==1.11.1.4 packaging==24.2 psutil==6.1.1 \
    && MAX_JOBS=8 pip install --no-cache-dir --no-build-isolation flash-attn==2.7.4.post1

WORKDIR /opt/moe-train
COPY . .
# The package with every runtime extra (not dev), then an unprivileged user to train as; its HOME
# holds the caches (Hugging Face, the torch extensions DeepSpeed builds).
RUN pip install --no-cache-dir "/opt/moe-train[gpu,s3,gcs,report]" \
    && useradd --create-home --uid 1000 --user-group --shell /bin/bash moe
USER 1000:1000
WORKDIR /home/moe

ENTRYPOINT ["moe-train"]
CMD ["--help"]
