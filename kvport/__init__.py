"""kvport: an LLM serving engine with pluggable hardware.

    from kvport import LLM, SamplingParams
    print(LLM().generate(["The capital of France is"], SamplingParams(max_tokens=16))[0].outputs[0].text)
"""
from kvport.core.sampling_params import InvalidRequestError, SamplingParams
from kvport.platforms.api_version import PLUGIN_API_VERSION
from kvport.platforms.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "InvalidRequestError", "hookimpl", "__version__",
           "PLUGIN_API_VERSION"]


def __getattr__(name: str):
    # LLM pulls in the engine; keep `import kvport` cheap for plugins and the CLI.
    if name == "LLM":
        from kvport.llm import LLM
        return LLM
    raise AttributeError(f"module 'kvport' has no attribute {name!r}")
