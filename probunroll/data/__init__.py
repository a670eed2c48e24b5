"""Synthetic generators and loaders for data shipped inside packages."""

from probunroll.data.digits import load_digits

__all__ = ["load_digits"]
