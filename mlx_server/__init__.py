"""mlx-server: a standalone MLX model-serving daemon with a memory manager."""

__version__ = "0.1.0"
