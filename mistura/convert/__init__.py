"""Checkpoint conversion between mistura and other formats (Hugging Face for now)."""

from mistura.convert.hf import config_from_hf, from_hf, load_hf_folder, state_dict_from_hf

__all__ = ["config_from_hf", "from_hf", "load_hf_folder", "state_dict_from_hf"]
