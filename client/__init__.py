"""Flower ClientApp and the site-side logic it adapts."""
