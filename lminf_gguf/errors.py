"""The exceptions of lminf_gguf. InvalidInputError and ContextFullError are the caller's mistakes (the server
answers them with 400); every other exception is ours (500)."""

from __future__ import annotations


class LMInfiniteError(Exception):
    """Base of lminf_gguf's own exceptions."""


class InvalidInputError(LMInfiniteError, ValueError):
    """A value the caller passed is not acceptable (a token id outside the vocabulary, an empty prompt, ...);
    param: the argument (or request field) it is about, where one is named (an HTTP server's 400 names it)."""

    def __init__(self, *args, param=None):
        super().__init__(*args)
        self.param = param


class InvalidTypeError(LMInfiniteError, TypeError):
    """An argument of a type the call does not accept."""


class ContextFullError(LMInfiniteError, RuntimeError):
    """Raised in "vanilla" mode when a stream would exceed n_ctx (LM-Infinite modes never raise it)."""


class Cancelled(LMInfiniteError, RuntimeError):
    """feed() or nll() stopped by cancel()."""


class StateError(LMInfiniteError, ValueError):
    """A state file that cannot be loaded into this session (not a state file, corrupt, other model/settings)."""


class SessionBusyError(LMInfiniteError, RuntimeError):
    """A session was called from a second thread while a call (or an unfinished stream) of another was running."""


class RemoteServerError(LMInfiniteError, RuntimeError):
    """An RPC server computing the model's layers went away (or answered malformed data) during a call: what that
    call computed is void, and the Model, every session on it included, fails from then on. Start the server
    again and load the model again. (llama.cpp's RPC client used to end the process here.)"""


# the caller's mistakes: an HTTP server answers them with 400, anything else with 500
CLIENT_ERRORS = (InvalidInputError, InvalidTypeError, ContextFullError, StateError)
