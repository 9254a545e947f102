"""Registry fixtures (owned by the registry work)."""
