"""The application's and requests' typed state keys (aiohttp `AppKey`/`RequestKey`).

One module so that handlers, middlewares and the app factory name the same objects.
"""

from __future__ import annotations

from aiohttp import web

from ..config import Config
from ..engine import Engine
from ..group.backend import GroupBackend
from ..manager import Manager
from ..metrics import Metrics
from ..reaper import Reaper

CONFIG = web.AppKey("config", Config)
ENGINE = web.AppKey("engine", Engine)
GROUPS = web.AppKey("groups", GroupBackend)  # generates for the models with a `distributed` key
MANAGER = web.AppKey("manager", Manager)
METRICS = web.AppKey("metrics", Metrics)
REAPER = web.AppKey("reaper", Reaper)
STARTED = web.AppKey("started", float)

MODEL_KEY = web.RequestKey("model", str)  # the model a request named, for logs and metrics
TOKENS_KEY = web.RequestKey("tokens", int)  # tokens generated, for the access log
RESPONSE_HEADERS = web.RequestKey("response_headers", dict)  # set by middlewares (CORS), for streams too
