"""Serving: the continuous-batching engine (gptcore.serve.engine) and its OpenAI-compatible
HTTP server (gptcore.serve.api; run it with ``python -m gptcore.serve --help``)."""
from gptcore.serve.engine import Engine, EngineFull, Event
from gptcore.serve.sampling import ParamError, SamplingParams

__all__ = ["Engine", "EngineFull", "Event", "ParamError", "SamplingParams"]
