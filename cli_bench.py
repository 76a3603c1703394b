"""`python -m medblip_edge.cli_bench SUITE ...` == medblip-bench SUITE ... (where the console scripts are not
installed: a GPU image with the package on PYTHONPATH, say)."""

from .cli import bench_main

if __name__ == "__main__":
    bench_main(prog_name="medblip-bench")
