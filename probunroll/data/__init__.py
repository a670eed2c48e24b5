"""Synthetic generators and loaders for data shipped inside packages."""

from probunroll.data.digits import load_digits
from probunroll.data.hierarchy import HierarchicalData, make_hierarchy

__all__ = ["HierarchicalData", "load_digits", "make_hierarchy"]
