"""Moved: `medblip-bench ray-cohort` (this old module path forwards to it, arguments unchanged)."""

if __name__ == "__main__":
    from .moved import forward

    forward("ray-cohort")
