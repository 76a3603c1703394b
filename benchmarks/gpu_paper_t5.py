"""Moved: the GPU rows are the pipeline suite on CUDA, through the runtime factory (this old module path names it)."""

if __name__ == "__main__":
    from .moved import gone

    gone("medblip-bench pipeline --device cuda --preset paper-t5 --backends torch --scan eval --compare-decode "
         "--batch 1,8 --iters 3 --reference-iters 1 --out DIR")
