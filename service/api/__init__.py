"""The HTTP API: one router per resource over shared dependencies, and one error handler."""
