"""Moving a tenant between the pool and a silo (promotion and demotion).

``engine`` holds the idempotent steps (each safe to re-run after a crash);
``control_plane.workflows.moves`` strings them together as a durable DBOS
workflow with progress, cancel and resume.
"""
