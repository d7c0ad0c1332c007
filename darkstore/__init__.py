"""darkstore: run a teacher ensemble once, distill many students from its cached soft targets.

This package holds what both halves share — the architecture registry with safe
weight loading (:mod:`darkstore.models`), transfer sets and their fingerprints
(:mod:`darkstore.data`), path policy (:mod:`darkstore.paths`) — and the command
line (:mod:`darkstore.cli`). ``teacher_service`` and ``student_trainer`` both
import it and ``storage``; neither imports the other.
"""

__version__ = "0.1.0"
