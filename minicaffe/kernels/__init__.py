"""Faster ways of computing what a layer's reference code computes (CPU and GPU kernels)."""
