"""lmcor.runtime: load a bundle, template and tokenize requests, schedule, encode and decode.

Data flows one way through these modules:
request (jsonl, request, options) -> template -> tokens -> sequence -> scheduler (batching, encode)
-> decode (drafts) -> text -> fallback, driven by engine; corrector, classifier and generator are
the loaded models' public faces, candidates asks a generator for an LLM's candidates.
"""
