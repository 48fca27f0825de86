"""Engines over the tiny model for the static-pass tests (test_compiled_suffix.py, test_static_vision.py)."""

from lrm_reward.core.engine import EngineConfig, make_engine


def tiny_engine(tiny, **kwargs):
    """make_engine over the tiny model and its three adapters; no compile warm-up unless asked for."""
    adapters = {name: str(path) for name, path in tiny.adapters.items()}
    kwargs.setdefault("compile_warmup_batches", ())
    return make_engine(EngineConfig(str(tiny.base), adapters, **kwargs))
