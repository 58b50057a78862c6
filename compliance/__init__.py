"""Audit log, data-subject rights, exports and reports: fed by the gateway, never importing it."""
