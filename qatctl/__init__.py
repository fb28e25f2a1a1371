"""qatctl: INT4 quantization-aware training -> INT4 checkpoint -> INT4 rollout -> RL update."""

__version__ = "0.1.0"
