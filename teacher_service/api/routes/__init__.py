"""One router per resource: jobs, stores, operations, docs."""
