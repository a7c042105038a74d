"""The audit trail: who did what, when, from where; sealed with a key kept outside the
database and anchored by a head kept outside it too, so edits and truncation are detectable."""
