"""The machine and its physical limit: batch-1 decoding reads every weight once per token,
so tokens/s cannot beat memory bandwidth / weight bytes."""

import os
import platform
import statistics
import time

import torch
from transformers import PreTrainedModel


def machine(threads: int) -> dict:
    """The machine, and the intra-op threads each measure runs with."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def memory_bandwidth_gb_s(megabytes: int = 512, repeats: int = 5, device: torch.device | str = "cpu") -> float:
    """Copy a buffer far larger than the caches, where the weights live; each copy reads and writes it once."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # GPU copies are asynchronous
    src = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages first
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def weight_bytes(model: PreTrainedModel) -> int:
    """Bytes of weight one decoding step reads: each distinct weight once, the int8 weights of
    dynamically quantised Linear layers (which are not parameters), and of an embedding table
    that no head reads (the int8 head keeps its own copy) only the one row it looks up."""
    head = model.get_output_embeddings()
    read_whole = getattr(head, "weight", None)  # a float head tied to the embedding reads all of it
    # The unpacked int8 weights are fresh tensors: they are kept until the end, or a freed one's
    # address could come back for the next and be taken for a weight already counted.
    seen, kept, total = set(), [], 0
    for module in model.modules():
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
            tensors = [t for t in (module.weight(), module.bias()) if t is not None]
        else:
            tensors = list(module.parameters(recurse=False))
        kept += tensors
        for t in tensors:
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            row_only = isinstance(module, torch.nn.Embedding) and t is not read_whole
            total += (t[0].numel() if row_only else t.numel()) * t.element_size()
    return total
