"""Moved: the vision graph's export check is the export's own (VISION_TOL enforced), reported by the export-quality
suite (this old module path names it)."""

if __name__ == "__main__":
    from .moved import gone

    gone("medblip-bench export-quality --presets paper-t5 --formats none --out DIR")
