"""The exact renderer: the integral of the trilinear interpolant along each ray, without sampling error."""
