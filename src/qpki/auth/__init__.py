"""Authentication: users, passwords, two-factor authentication, login sessions."""
