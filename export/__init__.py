"""lmcor.export: Hugging Face checkpoint -> validated ONNX bundle (needs the `export` extra)."""

from .seq2seq import export_corrector

__all__ = ["export_corrector"]
