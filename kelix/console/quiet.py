"""Library chatter off while the kit loads weights: transformers' and diffusers' own switches.

transformers 5 draws a "Loading weights" bar on every ``from_pretrained``, and both libraries log
warnings meant for their own users (unused weights of a head the kit replaces, deprecations). The kit
loads its parts through :func:`quiet_loading`, which turns those off with the libraries' switches
(``disable_progress_bar``, ``set_verbosity_error``) for the load only and restores the caller's
settings after; the kit's own progress bars (tqdm, on stderr) are untouched.
"""

from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def quiet_loading():
    """transformers and diffusers (where imported: chat never imports diffusers) without bars or warnings."""
    undo = contextlib.ExitStack()
    for name in ("transformers", "diffusers"):
        if name not in sys.modules:
            continue
        logging = sys.modules[f"{name}.utils"].logging if f"{name}.utils" in sys.modules else None
        if logging is None:
            continue
        verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
        logging.set_verbosity_error()
        logging.disable_progress_bar()
        undo.callback(logging.set_verbosity, verbosity)
        if bars:
            undo.callback(logging.enable_progress_bar)
    with undo:
        yield
