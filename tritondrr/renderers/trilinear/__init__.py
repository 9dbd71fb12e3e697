"""The sampled trilinear renderer: ``naive`` (PyTorch oracle), ``cpu`` (CPU product path), ``op`` (Triton)."""
