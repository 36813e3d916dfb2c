"""lminf_gguf: LM-Infinite (Han et al., NAACL 2024) in llama.cpp, for unbounded inputs with bounded memory."""

from . import _lib  # noqa: F401  (must come first: points llama_cpp at the patched library)
from .engine import CHATML_TEMPLATE, MODES, LMInfinite
from .errors import (Cancelled, ContextFullError, InvalidInputError, LMInfiniteError, RemoteServerError,
                     SessionBusyError, StateError)
from .models import Model, default_model_path

__version__ = "0.1.0"

__all__ = ["LMInfinite", "Model", "LMInfiniteError", "InvalidInputError", "ContextFullError", "Cancelled",
           "StateError", "SessionBusyError", "RemoteServerError",
           "CHATML_TEMPLATE", "MODES", "default_model_path", "__version__"]
