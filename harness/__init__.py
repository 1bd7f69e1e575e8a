"""The aTLAS harness: learn and benchmark anisotropic compositions of task vectors."""
__version__ = "0.1.0"
