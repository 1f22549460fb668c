"""lmcor.runtime: load a bundle, template and tokenize requests, batch, encode and decode.

Data flows one way through these modules:
request -> template -> tokens -> batching -> sessions (encoder) -> decode -> text.
"""
