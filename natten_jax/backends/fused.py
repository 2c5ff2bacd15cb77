"""The fused (FNA) CUDA backend. Filled in with the kernel."""


def can_run(p):
    return False, "the fused kernel is not built in this version"


def run(p, q, k, v, extra_k=None, extra_v=None):
    raise NotImplementedError(can_run(p)[1])
