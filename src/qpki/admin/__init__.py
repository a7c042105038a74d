"""Administration: users, emergency 2FA reset, the audit trail."""
