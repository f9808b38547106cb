"""Shared fixtures: the one tiny config, HF reference checkpoints, a loopback S3 server."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from moe_train.models.deepseek_v2.config import DeepseekV2Config

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_config(**overrides) -> DeepseekV2Config:
    return DeepseekV2Config.from_name("tiny", **overrides)


def hf_reference(cfg: DeepseekV2Config, seed: int = 0):
    """A transformers DeepseekV2ForCausalLM with random (non-default) weights, fp32."""
    from transformers import DeepseekV2Config as HFConfig, DeepseekV2ForCausalLM as HFModel

    d = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type", "torch_dtype")}
    torch.manual_seed(seed)
    model = HFModel(HFConfig(**d)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # norms at 1.0 would hide a missing weight multiply
            else:
                p.normal_(0.0, 0.05)
    return model


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto in server mode) on loopback; yields storage options."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)
    endpoint = f"http://127.0.0.1:{port}"
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, anon=False)
    fs.mkdir("moe-train-test")
    yield {"endpoint": endpoint, "storage_options": {"client_kwargs": {"endpoint_url": endpoint}}, "bucket": "moe-train-test"}
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
