"""Row kinds on the teachers' side: how a job of each kind loads its teachers and computes its chunks, one
module per kind, registered under the storage kind's name (:mod:`storage.kinds`).

- :mod:`.classes`: classifiers over arrays, images or datasets (and their recorded views);
- :mod:`.tokens`: language models over token sequences, a slice of positions at a time.

:mod:`teacher_service.generate` finds a job's kind here (``TEACHERS[kind.name]``) and does what is common to
every kind: the transfer set, the row order, shards, resuming and the store.
"""

from __future__ import annotations

from storage.kinds import KINDS

from .base import TeacherKind
from .classes import ClassTeachers
from .tokens import TokenTeachers

#: every kind's teachers, by the storage kind's name
TEACHERS: dict[str, TeacherKind] = {k.name: k for k in (ClassTeachers(), TokenTeachers())}
assert TEACHERS.keys() == KINDS.keys(), "every row kind needs its teachers' side"

__all__ = ["TEACHERS", "TeacherKind"]
