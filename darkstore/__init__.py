"""darkstore: run a teacher ensemble once, distill many students from its cached soft targets.

This package is the shared kernel: the error root (:mod:`darkstore.errors`), the architecture
registry with safe weight loading (:mod:`darkstore.models`), transfer sets and their fingerprints
(:mod:`darkstore.data`), path policy (:mod:`darkstore.paths`) and recorded-view recipes
(:mod:`darkstore.views`). It imports none of the other packages. ``storage`` builds on it;
``teacher_service`` and ``student_trainer`` build on both and never import each other; the
command line and the demo (``darkstore_app``) sit above everything.
"""

__version__ = "0.1.0"

#: the library API for your own training loop (student_trainer.api), imported on first use: ``import darkstore``
#: stays light (the CLI's --help does not load torch)
_PUBLIC = {"SoftTargets": "student_trainer.api", "Batch": "student_trainer.api", "kd_loss": "student_trainer.api",
           "soft_kl": "student_trainer.api", "open_store": "storage", "open_transfer_set": "darkstore.transfer"}


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'darkstore' has no attribute {name!r}")


__all__ = ["Batch", "SoftTargets", "__version__", "kd_loss", "open_store", "open_transfer_set", "soft_kl"]
