"""Distance from each pool row to its nearest labeled row: the start of k-center and k-means++.

Chunked exact kNN (k=1) with faiss (``faiss.knn`` on the CPU, ``bfKnn`` on CUDA when faiss
has GPU support) or torch; never an N x L matrix, one block of L at a time.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from alges_dist.errors import InputError

BACKENDS = ("auto", "faiss", "torch")
# faiss knn_gpu scratch space; bounded so selection fits beside a training job on the GPU.
FAISS_GPU_TEMP_MEMORY_BYTES = 256 * 2**20


def faiss_has_gpu() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto': faiss knn_gpu on CUDA when faiss has GPU support, else torch.

    On this project's CPU machine faiss-cpu's bundled OpenBLAS kNN is 3-5x slower than
    torch (ENVIRONMENT.md, "faiss-cpu"), so CPU defaults to torch; backend="faiss" forces it.
    """
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "faiss" if device.type == "cuda" and faiss_has_gpu() else "torch"
    if backend == "faiss":
        try:
            import faiss  # noqa: F401
        except ImportError as e:
            raise InputError("backend='faiss' needs faiss (pip install faiss-cpu or faiss-gpu); "
                             "or use backend='torch'") from e
        if device.type == "cuda" and not faiss_has_gpu():
            raise InputError(f"backend='faiss' on {device} needs a GPU build of faiss; use backend='torch'")
    return backend


def nearest_distances(q: torch.Tensor, q_sq: torch.Tensor, ref: torch.Tensor, ref_sq: torch.Tensor,
                      chunk_size: int, *, backend: str) -> torch.Tensor:
    """(nq,) squared distance from each query row to its nearest ref row (backend "faiss" or "torch")."""
    return (_faiss_nearest if backend == "faiss" else _torch_nearest)(q, q_sq, ref, ref_sq, chunk_size)


def _torch_nearest(q, q_sq, ref, ref_sq, chunk_size):
    """(nq,) squared distance from each query row to its nearest ref row; ref in blocks."""
    best = torch.full((q.shape[0],), math.inf, dtype=q.dtype, device=q.device)
    for a in range(0, ref.shape[0], chunk_size):
        # (nq, L_block) ||r||^2 - 2 q.r; ||q||^2 is the same along a row: added to the minimum only
        block = torch.addmm(ref_sq[None, a:a + chunk_size], q, ref[a:a + chunk_size].T, alpha=-2)
        torch.minimum(best, block.amin(dim=1), out=best)  # amin: min(dim=) stalls ~10 ms on busy cores
    return best + q_sq


_FAISS_GPU_RESOURCES: dict[int, Any] = {}  # one StandardGpuResources per device, made on first use


def _faiss_nearest(q, q_sq, ref, ref_sq, chunk_size):
    """faiss kNN (k=1, squared L2, float32): faiss.knn on CPU, knn_gpu-style bfKnn on CUDA."""
    import faiss

    q32, ref32 = q.float().contiguous(), ref.float().contiguous()
    if not q.is_cuda:
        return torch.from_numpy(faiss.knn(q32.numpy(), ref32.numpy(), 1)[0][:, 0])
    dev = q.device.index if q.device.index is not None else torch.cuda.current_device()
    if dev not in _FAISS_GPU_RESOURCES:
        res = faiss.StandardGpuResources()
        res.setTempMemory(FAISS_GPU_TEMP_MEMORY_BYTES)
        _FAISS_GPU_RESOURCES[dev] = res
    d2 = torch.empty(q.shape[0], 1, dtype=torch.float32, device=q.device)
    idx = torch.empty(q.shape[0], 1, dtype=torch.int64, device=q.device)
    args = faiss.GpuDistanceParams()  # as faiss.contrib.torch_utils' knn_gpu, without its global patching
    args.metric, args.k, args.dims = faiss.METRIC_L2, 1, q.shape[1]
    args.vectors, args.vectorType, args.numVectors = _faiss_ptr(ref32), faiss.DistanceDataType_F32, ref.shape[0]
    args.queries, args.queryType, args.numQueries = _faiss_ptr(q32), faiss.DistanceDataType_F32, q.shape[0]
    args.outDistances, args.outIndices = _faiss_ptr(d2), faiss.cast_integer_to_idx_t_ptr(idx.data_ptr())
    args.outIndicesType, args.device = faiss.IndicesDataType_I64, dev
    torch.cuda.synchronize(q.device)  # faiss runs on its own stream: inputs ready, outputs awaited
    faiss.bfKnn(_FAISS_GPU_RESOURCES[dev], args)
    torch.cuda.synchronize(q.device)
    return d2[:, 0]


def _faiss_ptr(t: torch.Tensor):
    import faiss

    return faiss.cast_integer_to_float_ptr(t.data_ptr())
