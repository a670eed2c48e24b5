"""Synthetic generators and loaders for data shipped inside packages."""
