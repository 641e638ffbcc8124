"""Flower ServerApp and the coordinator-side logic it adapts."""
