"""Reading raymem's checkpoints (``torch.save`` of tensors and plain containers) without running pickled code.

``torch.load(weights_only=True)`` refuses any file that would need pickle to rebuild an object; its message then
suggests ``weights_only=False``, which would run whatever code the file holds. raymem never does: such a file, or
anything torch cannot read, is a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import io
import pickle
import re
from typing import Any

import torch


class CheckpointError(ValueError):
    """A file that is not a raymem checkpoint; the message names it."""


def load_state(checkpoint: bytes, source: str = "the checkpoint") -> dict[str, Any]:
    """The dict saved in ``checkpoint`` (the bytes of a ``torch.save`` file), its tensors on CPU.

    source: the checkpoint's URI, for the error message.
    """
    try:
        state = torch.load(io.BytesIO(checkpoint), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        needed = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if needed:
            raise CheckpointError(f"{source} is not a raymem checkpoint: it needs pickle to load ({needed.group(1)}), "
                                  "which raymem refuses for safety (unpickling can run any code)") from None
        raise CheckpointError(f"{source} is not a raymem checkpoint: torch cannot read it as tensors") from None
    except Exception:  # noqa: BLE001 - torch's parser fails wherever such a file first breaks it
        raise CheckpointError(f"{source} is not a raymem checkpoint: torch cannot read it (not a torch.save file, or "
                              "a truncated one)") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{source} is not a raymem checkpoint: it holds a {type(state).__name__}, not a dict")
    return state
