"""Exact all-pairs Pearson-correlation search (compute core: importing this package never imports Ray).

- ``raymem.search.kernel``: the blocked search in one process (pure torch, CPU or CUDA), float64 recomputation.
- ``raymem.search.distributed``: the same tiles as Ray tasks over embeddings streamed into the object store.
- ``raymem.search.gpu``: a fused GPU reduction for the same search.
"""
