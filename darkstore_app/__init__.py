"""The application above both halves: the `darkstore` command line (:mod:`darkstore_app.cli`) and the
digits demo (:mod:`darkstore_app.demo`). It imports ``teacher_service``, ``student_trainer``, ``storage``
and the shared kernel ``darkstore``; nothing imports it."""
