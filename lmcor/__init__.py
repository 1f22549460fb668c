"""lmcor: a compiled inference runtime for small models that improve big ones.

    from lmcor import CorrectionOptions, Corrector
    corrector = Corrector.load("bundle/")
    corrector.correct("she go home", ["She goes home.", "She go home."])
    corrector.correct_batch(requests, options=CorrectionOptions(max_new_tokens=64))
    future = corrector.engine.submit(("she go home", ["She goes home."]))  # from any thread
"""

from lmcor.runtime.bundle import Template
from lmcor.runtime.classifier import Classification, Classifier
from lmcor.runtime.corrector import Corrector
from lmcor.runtime.engine import Engine
from lmcor.runtime.errors import BundleError, ExportError, InputError, LmcorError
from lmcor.runtime.generator import Generation, Generator
from lmcor.runtime.request import Correction, CorrectionOptions, Request, RequestStats
from lmcor.runtime.scheduler import EngineStats

__version__ = "0.1.0"

__all__ = [
    "BundleError",
    "Classification",
    "Classifier",
    "Correction",
    "CorrectionOptions",
    "Corrector",
    "Engine",
    "EngineStats",
    "ExportError",
    "Generation",
    "Generator",
    "InputError",
    "LmcorError",
    "Request",
    "RequestStats",
    "Template",
    "__version__",
]
