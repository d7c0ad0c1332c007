"""darkstore: run a teacher ensemble once, distill many students from its cached soft targets.

This package is the shared kernel: the error root (:mod:`darkstore.errors`), the architecture
registry with safe weight loading (:mod:`darkstore.models`), transfer sets and their fingerprints
(:mod:`darkstore.data`), path policy (:mod:`darkstore.paths`) and recorded-view recipes
(:mod:`darkstore.views`). It imports none of the other packages. ``storage`` builds on it;
``teacher_service`` and ``student_trainer`` build on both and never import each other; the
command line and the demo (``darkstore_app``) sit above everything.
"""

__version__ = "0.1.0"
