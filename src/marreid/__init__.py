"""marreid: unsupervised person re-identification by soft multilabel reference learning (MAR)."""

__version__ = "0.1.0"
