"""Flask glue shared by the blueprints: login sessions, roles, headers, limits, errors."""
