"""The stages of scripts/demo.py, one module per seam (see the script's docstring for the stages)."""
