"""Preference data to and from other tools' formats: exports (stage 5) and imports (`python -m capdpo import`).

`capdpo.formats.registry.FORMATS` lists every format and what capdpo can do with it; each format lives in a
module of its own (`trl`, `llamafactory`, `unidpo`, `rlaifv`, `mmrlhf`).
"""
