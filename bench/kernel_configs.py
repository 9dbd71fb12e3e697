"""The launch configurations the kernel benchmark times and ``bench/sass_count.py`` compiles.

``CONFIGS[mode]`` lists ``(BLOCK_R, BLOCK_S, num_warps)``; the first entry of each mode is what
``kernels/trilinear.py::launch_config`` picks on a GPU for 32 rays or more (chosen from the sm_90 SASS
counts, bench/results/sass-sm90.md; not yet timed), the others trade samples per lane
(``BLOCK_R * BLOCK_S / (32 * num_warps)``: 2, 4, 8, 16) against the
ray-block width that decides how many of a warp's gathers share cache lines. Kept small: every
entry is one compilation and one timing on the lent GPU, whose whole window is 15 minutes.
"""

CONFIGS = {
    "forward": [(16, 16, 4), (32, 16, 8), (64, 16, 4), (32, 32, 4), (64, 32, 4), (32, 32, 8), (32, 16, 4)],
    "backward_pose": [(32, 16, 8), (16, 16, 4), (32, 16, 4), (16, 32, 4), (32, 32, 4)],
    "backward_volume": [(32, 16, 8), (16, 16, 4), (32, 16, 4), (16, 32, 4), (32, 32, 4)],
}
