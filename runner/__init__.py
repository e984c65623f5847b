"""runner: an asyncio worker for PostgreSQL-backed jobs with one bounded pool and fenced leases."""

__version__ = "0.1.0"
