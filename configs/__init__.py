"""YAML presets, installed as the package ``recon.configs``: each file overrides typed defaults."""
