"""`python -m medblip_edge.benchmarks SUITE ...`: `medblip-bench SUITE ...` where the console scripts are not
installed (a GPU image with the package on PYTHONPATH, say)."""

from ..cli import bench_main

bench_main(prog_name="python -m medblip_edge.benchmarks")
