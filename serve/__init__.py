"""Serving and cluster runs on Ray: medblip-serve (Ray Serve) and medblip-infer --engine ray (Ray Data)."""
