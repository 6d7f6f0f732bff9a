"""Pipeline mode: two local ranks, each running half of the layers, answer like one
process. mlx_lm's Llama has no pipeline support, so the model here is a random Qwen2
(the test model's shapes) written by mlx_lm itself, with the weight index that
`sharded_load` reads in pipeline mode."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import ollama
import pytest

from mlx_server.testing import ready_daemon

LAUNCH_TIMEOUT = 300.0


def make_qwen2_model(path: Path, like: Path) -> Path:
    """A random Qwen2 with `like`'s config and tokenizer, saved by mlx_lm (index included)."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes, save_model

    config = {**json.loads((like / "config.json").read_text()), "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
    path.mkdir(parents=True)
    mx.random.seed(7)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    save_model(path, model, donate_model=False)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(like / name, path / name)
    return path


@pytest.fixture(scope="module")
def live(tmp_path_factory, test_model):
    qwen2 = make_qwen2_model(tmp_path_factory.mktemp("models") / "qwen2", test_model)
    models = [
        {"name": "one", "source": str(qwen2), "preload": True},
        {"name": "stages", "source": str(qwen2), "distributed": {"ranks": 2, "mode": "pipeline"}},
    ]
    with ready_daemon(tmp_path_factory.mktemp("pipeline"), models, ready="one") as daemon:
        yield daemon


def test_two_pipeline_stages_answer_like_one_process(live):
    client = ollama.Client(host=live.url, timeout=LAUNCH_TIMEOUT)
    options = {"temperature": 0, "num_predict": 8}
    for prompt in ("The capital of France is", "def fibonacci(n):"):
        one = client.generate(model="one", prompt=prompt, options=options, raw=True)
        stages = client.generate(model="stages", prompt=prompt, options=options, raw=True)
        assert stages.context == one.context and stages.eval_count == 8
    with urllib.request.urlopen(live.url + "/health", timeout=30) as r:
        group = next(m for m in json.load(r)["models"] if m["name"] == "stages:latest")["group"]
    assert (group["mode"], group["ranks_up"]) == ("pipeline", 2)
