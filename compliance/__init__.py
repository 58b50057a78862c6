"""Audit log, data-subject rights, exports and reports: fed by the gateway, never importing it.

The audit log: ``audit_writer.AuditWriter`` appends (``records.AuditRecord``) through
``appender.ChainAppender``; ``verify.LogVerifier`` checks it; ``retention`` expires it;
``reader.AuditReader`` reads it. Design: docs/audit.md.
"""
