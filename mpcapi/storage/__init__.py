"""Databases and Redis: connections, migrations and every SQL statement."""
