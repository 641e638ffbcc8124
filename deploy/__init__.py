"""Provisioning, site daemons and coordinator operations."""
