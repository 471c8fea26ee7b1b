"""A small procedural world for offline end-to-end runs: captioned scenes of coloured shapes
(``vocab``, ``scenes``, ``shapes``, ``render``, ``domains``, ``captions``), downstream tasks
(``tasks``) materialised to disk in the zhou split format (``build``), and their dataset-registry
entries (``datasets``, imported by the registry; this package itself imports nothing heavy)."""
