"""Which torch device a worker computes on: CUDA when present, else the CPU, unless told."""

import torch


def resolve_device(name: str | None = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
