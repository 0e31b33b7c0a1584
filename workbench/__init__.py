"""Partitioned U-Net Workbench."""
