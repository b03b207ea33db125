"""Experiments in miniature: the papers' comparisons on FashionScenes (``coopseg bench``)."""
