"""SSPO: Self-Sampling Preference Optimization for diffusion models."""

__version__ = "0.1.0"
