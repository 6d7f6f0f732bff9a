"""MLX and mlx_lm, imported by the engine thread when it starts.

They take over a second to import (mlx_lm pulls in transformers), so the HTTP
server answers at once and no other thread ever imports, let alone calls, MLX.
Modules of this package read them as `libs.mx`, `libs.lm_generate`, ... at call time.
"""

from __future__ import annotations

import importlib
from typing import Any

mx: Any = None  # mlx.core
mlx_utils: Any = None  # mlx.utils
lm_generate: Any = None  # mlx_lm.generate
lm_cache: Any = None  # mlx_lm.models.cache
lm_sample: Any = None  # mlx_lm.sample_utils
lm_utils: Any = None  # mlx_lm.utils


def import_mlx() -> None:
    global mx, mlx_utils, lm_generate, lm_cache, lm_sample, lm_utils
    # import_module, not attribute access: the package `mlx_lm` exports a *function* `generate`.
    mx, mlx_utils = importlib.import_module("mlx.core"), importlib.import_module("mlx.utils")
    lm_generate = importlib.import_module("mlx_lm.generate")
    lm_cache = importlib.import_module("mlx_lm.models.cache")
    lm_sample = importlib.import_module("mlx_lm.sample_utils")
    lm_utils = importlib.import_module("mlx_lm.utils")
