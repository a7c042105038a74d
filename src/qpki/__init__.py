"""qPKI account security: password login, TOTP two-factor authentication, backup codes, audit."""

__version__ = "0.1.0"
