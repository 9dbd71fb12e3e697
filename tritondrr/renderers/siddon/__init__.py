"""The exact Siddon renderer: the nearest-neighbour field integrated exactly along each ray segment.

``naive.integrate`` is the plain-PyTorch path (CPU, MPS, the oracle); ``op.integrate`` is the same
function on the Triton kernels of ``tritondrr.kernels.siddon`` (imported lazily: import ``op``
only for the Triton backend). The maths and conventions are stated once, in ``naive``'s docstring.
"""
