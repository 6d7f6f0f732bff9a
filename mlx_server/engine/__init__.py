"""The engine: one thread that owns every MLX call (see core.py).

Modules, each with one job: `core` (the thread, its commands and its death),
`commands` (what the event loop sends), `runner` (one model's batch and single
streams, the lone stream's move into the batch, and their failures), `single` (a
stream on its own decode loop, prefilled in slices), `sequence` (tokens to text and
logprobs), `sampling`, `stops`, `prompt_cache`, `disk_tier` (a model's prompt caches
on disk, saved behind), `loading`, `embedding`, `outbox` (events back to the loops),
`memory`, `stats`, `faults`, `libs` (MLX, imported on the thread).
"""

from .core import Engine
from .stats import EngineStats, LoadedWeights, ModelStats

__all__ = ["Engine", "EngineStats", "LoadedWeights", "ModelStats"]
