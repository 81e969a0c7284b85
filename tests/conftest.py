"""Shared fixtures. Behaviour tests use the real packaged SmolLM2; structural tests use tiny models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from steering.loading import LoadedModel, load_model
from steering.registry import load_registry
from steering.settings import Paths, paths_from_env

SMOLLM = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def paths() -> Paths:
    return paths_from_env()


@pytest.fixture(scope="session")
def smollm(paths: Paths) -> LoadedModel:
    torch.manual_seed(0)
    return load_model(load_registry(paths.registry).get(SMOLLM), paths.cache, device="cpu")
