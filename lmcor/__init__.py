"""lmcor: a compiled inference runtime for small models that improve big ones.

    from lmcor import Corrector
    corrector = Corrector.load("bundle/")
    corrector.correct("she go home", ["She goes home.", "She go home."])
"""

from lmcor.runtime.bundle import Template
from lmcor.runtime.classifier import Classification, Classifier
from lmcor.runtime.corrector import Corrector
from lmcor.runtime.errors import BundleError, ExportError, InputError, LmcorError
from lmcor.runtime.generator import Generation, Generator
from lmcor.runtime.request import Correction, DecodeStats, Request

__version__ = "0.1.0"

__all__ = [
    "BundleError",
    "Classification",
    "Classifier",
    "Correction",
    "Corrector",
    "DecodeStats",
    "ExportError",
    "Generation",
    "Generator",
    "InputError",
    "LmcorError",
    "Request",
    "Template",
    "__version__",
]
