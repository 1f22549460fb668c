"""packed batch -> encoder states, left on the session's device for the decoder."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .sessions import Sessions


def encode(sessions: Sessions, input_ids: np.ndarray, attention_mask: np.ndarray, *, repeat: int = 1) -> ort.OrtValue:
    """Run the encoder; with `repeat` > 1 each row is repeated in place (row0 x n, row1 x n...) for beams."""
    io = sessions.encoder.io_binding()
    io.bind_cpu_input("input_ids", input_ids)
    io.bind_cpu_input("attention_mask", attention_mask)
    io.bind_output("last_hidden_state", sessions.device)
    sessions.encoder.run_with_iobinding(io)
    hidden = io.get_outputs()[0]
    if repeat == 1:
        return hidden
    return ort.OrtValue.ortvalue_from_numpy(np.repeat(hidden.numpy(), repeat, axis=0), sessions.device, 0)
