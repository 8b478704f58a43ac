"""Architectures: one :class:`ArchSpec` row each, in :mod:`common.archs.table`."""

from common.archs.spec import ArchSpec, HParams, permute_rows, unpermute_rows
from common.archs.table import ARCHS, IMPORTS, by_hf_arch, by_model_type, hf_defaults

__all__ = ["ARCHS", "IMPORTS", "ArchSpec", "HParams", "by_hf_arch", "by_model_type", "hf_defaults", "permute_rows",
           "unpermute_rows"]
