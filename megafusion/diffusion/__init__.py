"""Noise schedules and the diffusion objective."""
