"""Import torch on a background thread while a merge plans and copies untouched tensors.

``import torch`` costs about two seconds of one core, a fixed cost ``cp`` does not pay. A
merge needs torch only for the tensors it changes: the planning (headers, config, names)
and the file-to-file copies of everything else do not. Starting the import first lets
that work run on the other core meanwhile. Any ``import torch`` elsewhere simply waits
for this one (Python's per-module import lock), so nothing is imported twice.
"""

from __future__ import annotations

import sys
import threading

_thread: threading.Thread | None = None


def _import() -> None:
    import torch  # noqa: F401


def start_torch_import() -> None:
    """Begin importing torch in the background (no-op when it is imported or under way).

    Not a daemon thread: an early error exit waits for the import to finish rather than
    tearing the interpreter down under a half-initialized extension module.
    """
    global _thread
    if "torch" in sys.modules or (_thread is not None and _thread.is_alive()):
        return
    _thread = threading.Thread(target=_import, name="lora-import-torch")
    _thread.start()


def torch_loading() -> bool:
    """True while the background import is still running."""
    return _thread is not None and _thread.is_alive()


def wait_for_torch() -> None:
    """Wait for the background import in a plain thread join, not inside ``import torch``:
    an interrupt raises here at once, while one that lands in importlib's frames must wait
    for the import to finish (``lora_cli/interrupts.py``)."""
    thread = _thread
    if thread is not None and thread.is_alive():
        thread.join()
