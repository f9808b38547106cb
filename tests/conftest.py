"""Shared fixtures: the one tiny config, HF reference checkpoints, a loopback S3 server."""

from __future__ import annotations

import os

import pytest
import torch

from moe_train.models.common.experts import ExpertLayout
from moe_train.models.deepseek_v2.config import DeepseekV2Config

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The tiny recipe's expert layout: two shards of four experts per layer.
TINY_LAYOUT = ExpertLayout("shard", 4)


def tiny_config(**overrides) -> DeepseekV2Config:
    return DeepseekV2Config.from_name("tiny", **overrides)


def randomised_hf_model(hf_config_cls, hf_model_cls, cfg, seed: int = 0):
    """transformers' model of cfg's family (hf_model_cls built from hf_config_cls) with random,
    non-default weights, fp32: the reference every parity test compares against."""
    d = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type", "torch_dtype")}
    torch.manual_seed(seed)
    model = hf_model_cls(hf_config_cls(**d)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # norms at 1.0 would hide a missing weight multiply
            else:
                p.normal_(0.0, 0.05)
    return model


def hf_reference(cfg: DeepseekV2Config, seed: int = 0):
    """A transformers DeepseekV2ForCausalLM with random (non-default) weights, fp32."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    return randomised_hf_model(DeepseekV2Config, DeepseekV2ForCausalLM, cfg, seed)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto in server mode) on loopback; yields endpoint, storage options, bucket."""
    import s3fs

    from bench.common import moto_s3

    with moto_s3() as options:
        s3fs.S3FileSystem(**options, anon=False).mkdir("moe-train-test")
        yield {
            "endpoint": options["client_kwargs"]["endpoint_url"],
            "storage_options": options,
            "bucket": "moe-train-test",
        }


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist a module-scoped fixture runs once on every worker that gets one of its tests, so a
    shared 2-rank training run would run on both workers.  A module's tests that share such a fixture go to one
    worker (the suite runs with ``--dist loadgroup``); an explicit ``xdist_group`` (the Slurm cluster's) wins."""
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        fixtures = item._fixtureinfo.name2fixturedefs  # pytest has no public view of a test's fixture scopes
        if any(defs[-1].scope == "module" for defs in fixtures.values()):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
