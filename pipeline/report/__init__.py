"""Figures and the HTML report of a study (matplotlib; imported only by ``report``/``evaluate``)."""
