"""darkstore teacher service: turn a job spec (teachers + transfer set + options) into a store.

The pure generation function lives in :mod:`teacher_service.generate`; the CLI,
the HTTP API and the Celery tasks are thin shells around it.
"""
