"""Tables of the per-role 2FA policies, grace periods and remembered devices."""
