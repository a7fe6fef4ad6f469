"""
Memory: what a run holds at its peak (metrics.jsonl's peak_memory_mb).
"""
import torch


def peak_memory_mb(device) -> float:
    """Peak memory so far, MiB: CUDA memory allocated by torch on a GPU, the process's peak RSS on a
    CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux reports KiB
