"""Unit tests of the actor core (``actors/``), run under trio with pytest-trio."""
